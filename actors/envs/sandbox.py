"""The ``python`` tool: run untrusted code in a bubblewrap sandbox with hard limits.

``bwrap`` (Debian/Ubuntu package ``bubblewrap``, the sandbox Flatpak uses) builds
the jail from kernel namespaces; fleetrl only chooses what goes in it:

* **filesystem**: the system's ``/usr`` (and ``/bin``, ``/lib*`` links) read-only,
  a fresh ``/proc`` and minimal ``/dev``, a read-only root, and an empty tmpfs
  ``/tmp`` of ``file_mb`` as the only writable place (and the working directory). Nothing of
  the host's ``/home``, ``/root``, ``/etc``, ``/tmp`` or the run directory is visible;
* **namespaces**: every one bwrap can unshare (network: only a down loopback; pid:
  the code sees itself alone, and runs as the namespace's pid 1, so everything it
  starts dies with it; ipc, uts, user, cgroup), ``--die-with-parent`` and
  ``--new-session`` (no terminal injection). (bwrap's own init process would outlive
  it as a zombie where the machine's pid 1 reaps none, as in containers, and zombies
  count against the process limit.)
* **limits** (rlimits set by util-linux's ``prlimit`` before it execs bwrap): CPU
  seconds, address space (memory), file size, open files, and processes. As root the
  code runs under a uid of its own (a fresh one per sandbox): the process limit
  counts that sandbox's tasks only, and root would ignore it; as another user it counts
  all of that user's tasks, so the limit is set above what the user already runs.
  Wall time and output size are enforced here: past either the whole process group
  is killed.

If the sandbox itself cannot start (bwrap or prlimit missing, no namespaces), the
result's reason starts with ``sandbox_failed``: that is the environment failing,
not the code, and the python tool raises ``EnvError`` for it (the episode is
excluded, never shown a made-up tool error).

Every way a call ends is a ``SandboxResult``; an escape attempt, a fork bomb, an
infinite loop, a memory bomb or a flood of output is an error result within its
limit, and the worker keeps running.
"""

from __future__ import annotations

import itertools
import os
import select
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass

from actors.validation import require


@dataclass(kw_only=True)
class SandboxLimits:
    cpu_s: int = 5
    """CPU seconds (RLIMIT_CPU; the kernel sends SIGXCPU, then SIGKILL)."""
    wall_s: float = 10.0
    """Wall-clock seconds before the sandbox's process group is killed."""
    memory_mb: int = 512
    """Address space of each process (RLIMIT_AS): a memory bomb gets MemoryError."""
    output_bytes: int = 16384
    """stdout + stderr kept; more kills the code (a flood ends the call, not the worker)."""
    processes: int = 16
    """Processes and threads (RLIMIT_NPROC, for the sandbox's own uid when started as root)."""
    file_mb: int = 16
    """Size of the writable /tmp and of any one file written (RLIMIT_FSIZE)."""
    python: str = ""
    """Interpreter inside the sandbox (must live under /usr): empty = ``/usr/bin/python3``."""

    def __post_init__(self):
        for key in ("cpu_s", "wall_s", "memory_mb", "output_bytes", "processes", "file_mb"):
            require(getattr(self, key) > 0, f"env.sandbox.{key}", "must be > 0")
        require(not self.python or self.python.startswith("/usr/"), "env.sandbox.python",
                "must be an interpreter under /usr (only /usr is mounted in the sandbox)")


@dataclass(frozen=True)
class SandboxResult:
    output: str
    """stdout and stderr as the code wrote them (at most ``output_bytes``)."""
    ok: bool
    """Exit status 0 within every limit."""
    reason: str = ""
    """Why not ok: ``exit N``, ``signal NAME``, ``cpu_time``, ``wall_time``, ``output_limit``, ``memory``."""
    seconds: float = 0.0


def sandbox_unavailable(limits: SandboxLimits | None = None) -> str | None:
    """Why the python tool cannot run here, or None (one real sandboxed ``print``)."""
    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed (apt-get install bubblewrap)"
    limits = limits or SandboxLimits()
    if not os.access(limits.python or "/usr/bin/python3", os.X_OK):
        return f"no interpreter at {limits.python or '/usr/bin/python3'} (env.sandbox.python)"
    probe = run_python("print(6 * 7)", limits)
    if probe.output.strip() != "42":
        return f"bubblewrap cannot run the sandbox here: {probe.reason}: {probe.output.strip()[:200]}"
    return None


def run_python(code: str, limits: SandboxLimits) -> SandboxResult:
    """Run ``code`` (read from stdin by ``python -I -``) in a fresh sandbox."""
    t0 = time.monotonic()
    try:
        proc = _spawn(limits)
    except OSError as e:  # bwrap or prlimit missing
        return SandboxResult(output="", ok=False, reason=f"sandbox_failed: {e}", seconds=time.monotonic() - t0)
    return _run_in(proc, code, limits, t0)


class SandboxPool:
    """Sandboxes started ahead of their calls: each is already waiting for its code on stdin, so
    a call pays for writing it and running it, not for starting bwrap and the interpreter (25-28
    ms of a 0.1 ms ``print`` here). Each sandbox serves one call and is never reused: the next
    one is started as this one is taken. Thread-safe."""

    def __init__(self, limits: SandboxLimits, size: int = 2):
        self.limits, self.size = limits, size
        self.ready: list[subprocess.Popen] = []
        self.lock = threading.Lock()
        self.closed = False

    def run(self, code: str) -> SandboxResult:
        t0 = time.monotonic()
        with self.lock:
            while self.ready and self.ready[0].poll() is not None:  # died while waiting: never used
                self.ready.pop(0).wait()
            proc = self.ready.pop(0) if self.ready else None
        threading.Thread(target=self._fill, name="sandbox-pool", daemon=True).start()
        if proc is None:
            return run_python(code, self.limits)
        return _run_in(proc, code, self.limits, t0)

    def _fill(self) -> None:
        with self.lock:
            missing = 0 if self.closed else self.size - len(self.ready)
        for _ in range(missing):
            try:
                proc = _spawn(self.limits)
            except OSError:
                return  # run_python reports it on the next call
            with self.lock:
                if self.closed or len(self.ready) >= self.size:
                    _kill(proc)
                    proc.wait()
                    return
                self.ready.append(proc)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            procs, self.ready = self.ready, []
        for proc in procs:
            _kill(proc)
            proc.wait()


_UIDS = itertools.count()


def _spawn(limits: SandboxLimits) -> subprocess.Popen:
    """bwrap + ``python -I -`` under the rlimits (util-linux's ``prlimit``: no preexec_fn, this
    process has threads), as root under a uid of the sandbox's own (a fresh one per sandbox,
    so the process limit counts that sandbox's processes alone)."""
    python = limits.python or "/usr/bin/python3"
    argv = ["bwrap", "--unshare-all", "--as-pid-1", "--die-with-parent", "--new-session", "--ro-bind", "/usr", "/usr"]
    for link in ("/bin", "/sbin", "/lib", "/lib64", "/lib32"):
        if os.path.islink(link):
            argv += ["--symlink", os.readlink(link), link]
        elif os.path.isdir(link):
            argv += ["--ro-bind", link, link]
    argv += ["--proc", "/proc", "--dev", "/dev", "--size", str(limits.file_mb << 20), "--tmpfs", "/tmp",
             "--remount-ro", "/", "--chdir", "/tmp", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv",
             "HOME", "/tmp", "--setenv", "PYTHONDONTWRITEBYTECODE", "1", "--", python, "-I", "-"]
    mem, fsize = limits.memory_mb << 20, limits.file_mb << 20
    nproc = _tasks_of_this_user() + limits.processes + 2  # prlimit and bwrap themselves, then the code
    argv = ["prlimit", f"--cpu={limits.cpu_s}:{limits.cpu_s + 1}", f"--as={mem}", f"--fsize={fsize}",
            "--nofile=64", "--core=0", f"--nproc={nproc}", "--", *argv]
    uid = 100_000 + (os.getpid() * 1024 + next(_UIDS)) % 800_000 if os.geteuid() == 0 else None
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, **(dict(user=uid, group=uid, extra_groups=[]) if uid else {}))


def _run_in(proc: subprocess.Popen, code: str, limits: SandboxLimits, t0: float) -> SandboxResult:
    """Hand ``code`` to a started sandbox and collect what it does, within the limits from ``t0``."""
    try:
        proc.stdin.write(code.encode(errors="replace"))
        proc.stdin.close()
    except BrokenPipeError:  # the sandbox died before reading its code
        pass
    out, reason = _collect(proc, limits, t0)
    if reason:
        _kill(proc)
    status = proc.wait()
    seconds = time.monotonic() - t0
    if not reason and status != 0:
        reason = _status_reason(status, out, seconds, limits)
        if out.startswith((b"bwrap:", b"prlimit:")):  # the sandbox itself failed, not the code in it
            reason = f"sandbox_failed: {out.decode(errors='replace').strip()[:200]}"
    return SandboxResult(output=out.decode(errors="replace"), ok=not reason, reason=reason, seconds=seconds)


def _collect(proc: subprocess.Popen, limits: SandboxLimits, t0: float) -> tuple[bytes, str]:
    """Read the code's output until it exits, the wall time passes or the output limit is hit."""
    out = bytearray()
    fd = proc.stdout.fileno()
    while True:
        left = limits.wall_s - (time.monotonic() - t0)
        if left <= 0:
            return bytes(out), "wall_time"
        ready, _, _ = select.select([fd], [], [], min(left, 0.5))
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return bytes(out), ""
        out += chunk
        if len(out) > limits.output_bytes:
            return bytes(out[:limits.output_bytes]), "output_limit"


def _status_reason(status: int, out: bytes, seconds: float, limits: SandboxLimits) -> str:
    # bwrap exits 128 + N when the code inside died of signal N
    signum = -status if status < 0 else status - 128 if status > 128 else 0
    if signum in signal.Signals._value2member_map_:
        name = signal.Signals(signum).name
        return "cpu_time" if name in ("SIGXCPU", "SIGKILL") and seconds >= limits.cpu_s * 0.9 else f"signal {name}"
    if b"MemoryError" in out:
        return "memory"
    return f"exit {status}"


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # bwrap and, with it, the sandbox's pid namespace
    except ProcessLookupError:
        pass


def _tasks_of_this_user() -> int:
    """How many tasks (threads) this non-root user runs: RLIMIT_NPROC counts them all.
    As root: 0 (the sandbox runs under a uid of its own)."""
    if os.geteuid() == 0:
        return 0
    uid, count = os.getuid(), 0
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and os.stat(f"/proc/{pid}").st_uid == uid:
                count += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            pass
    return count
