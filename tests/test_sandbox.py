"""The ``python`` tool's bubblewrap sandbox against the escapes that matter.

Real ``bwrap`` processes, real limits: each attempt must end the call with an error
result within its limit while this process (the worker) goes on. Skipped, saying
why, where bubblewrap cannot run; ``.ci/run`` sets ``FLEETRL_EXPECT_SANDBOX=1``,
which turns that skip into a failure (tests/test_install.py).
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from actors.envs.sandbox import SandboxLimits, SandboxPool, run_python, sandbox_unavailable
from tests.conftest import wait_for

WHY = sandbox_unavailable()
pytestmark = pytest.mark.skipif(WHY is not None, reason=f"the sandbox cannot run here: {WHY}")

LIMITS = SandboxLimits(cpu_s=2, wall_s=6.0, memory_mb=256, output_bytes=4096, processes=8, file_mb=4)


def run(code: str, limits: SandboxLimits = LIMITS):
    t0 = time.monotonic()
    result = run_python(code, limits)
    return result, time.monotonic() - t0


def test_code_runs_and_prints():
    result, took = run("import math\nprint(math.factorial(20))")
    assert result.ok and result.output.strip() == "2432902008176640000", result
    assert took < 5


def test_an_exception_is_an_error_with_its_traceback():
    result, _ = run("raise ValueError('nope')")
    assert not result.ok and result.reason == "exit 1" and "ValueError: nope" in result.output


def test_no_network(tmp_path):
    """A server listening on this machine's loopback is out of reach (the sandbox has its own,
    down, network namespace), and so is every other address."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    port = server.getsockname()[1]
    try:
        result, _ = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')")
        assert not result.ok and "connected" not in result.output
        assert "OSError" in result.output or "Network is unreachable" in result.output or "refused" in result.output
        result, _ = run("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=2)")
        assert not result.ok
        assert not accepted, "the sandbox reached a server on the host's loopback"
    finally:
        server.close()


def test_files_outside_are_invisible_and_unwritable(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("the run's token")
    result, _ = run(f"print(open({str(secret)!r}).read())")
    assert not result.ok and "FileNotFoundError" in result.output and "token" not in result.output
    for target in ("/usr/lib/evil.txt", "/evil.txt", str(tmp_path / "written.txt")):
        result, _ = run(f"open({target!r}, 'w').write('x')")
        assert not result.ok, target
    assert not (tmp_path / "written.txt").exists()
    # the one writable place is the sandbox's own /tmp, gone after the call
    result, _ = run("open('/tmp/scratch', 'w').write('ok')\nprint(open('/tmp/scratch').read())")
    assert result.ok and result.output.strip() == "ok"
    assert not os.path.exists("/tmp/scratch") or open("/tmp/scratch").read() != "ok"


def test_a_fork_bomb_is_contained():
    before = len(os.listdir("/proc"))
    result, took = run("import os\nwhile True:\n    os.fork()")
    assert not result.ok and took < LIMITS.wall_s + 3, (result.reason, took)
    # nothing of it survives the call
    time.sleep(0.5)
    assert len(os.listdir("/proc")) <= before + 5


def test_an_infinite_loop_ends_at_the_cpu_limit():
    result, took = run("while True:\n    pass")
    assert not result.ok and result.reason in ("cpu_time", "wall_time") and took < LIMITS.wall_s + 2, (result, took)


def test_sleeping_forever_ends_at_the_wall_limit():
    limits = SandboxLimits(cpu_s=2, wall_s=1.5, memory_mb=256, output_bytes=4096, processes=8, file_mb=4)
    result, took = run("import time\ntime.sleep(60)", limits)
    assert not result.ok and result.reason == "wall_time" and took < 4, (result, took)


def test_a_gigabyte_of_output_is_cut_at_the_output_limit():
    result, took = run("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)")
    assert not result.ok and result.reason == "output_limit" and len(result.output) == LIMITS.output_bytes
    assert took < 3


def test_a_memory_bomb_fails_inside_the_sandbox():
    result, took = run("x = bytearray(2 * 1024**3)\nprint('allocated')")
    assert not result.ok and "allocated" not in result.output and "MemoryError" in result.output, result
    assert result.reason == "memory" and took < 5


def test_a_big_file_is_cut_at_the_file_limit():
    result, _ = run("f = open('/tmp/big', 'wb')\nfor _ in range(64):\n    f.write(b'x' * 1024**2)\nprint('wrote')")
    assert not result.ok and "wrote" not in result.output


def test_many_calls_in_a_row_leave_nothing_behind():
    """bwrap's own init process inside a pid namespace outlives bwrap as a zombie where the
    machine's pid 1 reaps none (containers): they counted against the process limit and made
    every call after ~18 fail. The code runs as the namespace's pid 1 (--as-pid-1) instead."""
    def zombies() -> int:
        return sum(1 for pid in os.listdir("/proc") if pid.isdigit() and _state(pid) == "Z")

    before = zombies()
    results = [run_python("print(1)", LIMITS) for _ in range(30)]
    assert [r.output.strip() for r in results] == ["1"] * 30, {r.reason for r in results}
    assert zombies() <= before


def _state(pid: str) -> str:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def test_a_pool_starts_sandboxes_ahead_and_never_reuses_one():
    """Pooled sandboxes are started before their calls; each serves one call (what a call left
    in /tmp is gone for the next), and the limits hold for pooled ones too."""
    pool = SandboxPool(LIMITS, size=2)
    try:
        first = pool.run("open('/tmp/left', 'w').write('x')\nprint('wrote')")
        assert first.ok and first.output.strip() == "wrote"
        wait_for(lambda: len(pool.ready) == 2, 30, what="the pool to hold two started sandboxes")
        second = pool.run("import os\nprint(os.path.exists('/tmp/left'))")
        assert second.ok and second.output.strip() == "False"
        wait_for(lambda: len(pool.ready) == 2, 30, what="the pool to refill")
        bomb = pool.run("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)")
        assert not bomb.ok and bomb.reason == "output_limit"
        slow = pool.run("while True:\n    pass")
        assert not slow.ok and slow.reason in ("cpu_time", "wall_time")
    finally:
        pool.close()
    assert pool.ready == []
