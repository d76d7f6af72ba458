"""``math``: answer equivalence with HF's math-verify, in a child process with a per-sample deadline.

math-verify (sympy underneath) can run for ever on adversarial input (a tower
like ``9^{9^{9^{9}}}`` compared with a number); its own timeouts use
``signal.alarm``, which works only in the main thread, and reward functions run
in Ray actor threads. So ``MathVerifier`` runs verification in one persistent
child process, started lazily on first use: a fresh interpreter (fork+exec by
``subprocess``, never a bare fork of a threaded process; unlike multiprocessing's
"spawn" it does not re-run the parent's ``__main__``, which would re-run an
unguarded user script or import Ray in every child) talking over a
``multiprocessing.connection`` socket pair. It sends the child the batch and waits for each
sample's verdict with a deadline of ``timeout_s``. A sample that runs past it is
an ``Excluded(Exclusion.REWARD_TIMEOUT, ...)``, not a 0.0: the child is killed
and, if samples remain, a new one started for them. A child that dies on a
sample excludes that sample (``reward_error``) the same way. The child is
stopped at interpreter exit (``weakref.finalize``, an atexit hook) and by
``close()``; it also dies with its parent (``mathchild``: ``PR_SET_PDEATHSIG`` on
Linux, and a thread polling the parent's pid).

What is compared (``gold_text``, ``prediction_text``): GSM8K-style text keeps what
follows the last ``####`` (thousands commas dropped: ``1,000`` -> ``1000``); the
last ``max_chars`` characters of either side are verified (answers come last;
1 MB of garbage costs no more than ``max_chars``). An empty side scores 0.0.
"""

from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import sys
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection

from actors.types import Excluded, Exclusion
from actors.validation import require

_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def gold_text(answer, max_chars: int = 10_000) -> str:
    """The gold answer to verify against: after the last ``####`` if there is one (GSM8K), else
    the whole text; stripped, at most the last ``max_chars`` characters; None -> ``""``."""
    if answer is None:
        return ""
    text = str(answer)
    if "####" in text:
        text = _plain(text.rpartition("####")[2])
    return text.strip()[-max_chars:]


def prediction_text(completion: str, max_chars: int = 10_000) -> str:
    """What a completion answers: the first line after its last ``####`` if it has one
    (``"...reasoning... #### 42"``), else the whole completion (math-verify finds ``\\boxed{}``,
    "the answer is 42", the last number); stripped, at most the last ``max_chars`` characters."""
    text = str(completion)
    if "####" in text:
        tail = text.rpartition("####")[2].strip()
        text = _plain(tail.partition("\n")[0])
    return text.strip()[-max_chars:]


def _plain(text: str) -> str:
    """``" 1,000."`` -> ``"1000"``: thousands commas and one trailing period dropped."""
    text = _THOUSANDS.sub("", text.strip())
    return text[:-1] if text.endswith(".") else text


class _Died(Exception):
    """The child process is gone (its exit code is the message)."""


class _Child:
    """One verifier process (a fresh interpreter running ``mathchild.main``) and the parent's
    end of its socket pair (a ``multiprocessing.connection`` Connection)."""

    def __init__(self, start_timeout_s: float, max_memory_mb: int):
        mine, theirs = socket.socketpair()
        code = (f"import sys; sys.path[:0] = {[p for p in sys.path if p]!r}; "
                f"from actors.reward.verifiers import mathchild; "
                f"mathchild.main({theirs.fileno()}, {os.getpid()}, {max_memory_mb})")
        try:
            self.proc = _launch([sys.executable, "-c", code], theirs.fileno())
        except OSError as e:
            mine.close()
            raise _Died(f"could not be started: {e}") from None
        finally:
            theirs.close()
        self.conn = Connection(mine.detach())
        self.stop = weakref.finalize(self, _stop, self.proc, self.conn)  # also runs at interpreter exit
        try:
            if self.wait(start_timeout_s) != ("ready",):
                raise _Died("sent no ready message")
        except (_Died, TimeoutError) as e:
            self.stop()
            raise _Died(f"did not start: {e}") from None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, batch: list[tuple[str, str]]) -> None:
        try:
            self.conn.send(batch)
        except OSError as e:
            raise _Died(f"pipe closed: {e}") from None

    def wait(self, timeout_s: float):
        """The child's next message; TimeoutError after ``timeout_s``, ``_Died`` if it exited."""
        try:
            ready = self.conn.poll(timeout_s)
            message = self.conn.recv() if ready else None
        except (EOFError, OSError):
            try:
                code = self.proc.wait(1.0)
            except subprocess.TimeoutExpired:
                code = None
            raise _Died(f"exit code {code}") from None
        if not ready:
            raise TimeoutError(f"no answer within {timeout_s:g}s")
        return message


_launcher: ThreadPoolExecutor | None = None
_launcher_lock = threading.Lock()


def _launch(argv: list[str], fd: int) -> subprocess.Popen:
    """Start a child from the one launcher thread, which lives as long as this process: the
    child's ``PR_SET_PDEATHSIG`` fires when the thread that started it ends, and the calling
    thread (a Ray actor's) may end long before the verifier does."""
    global _launcher
    with _launcher_lock:
        if _launcher is None:
            _launcher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleetrl-math-launcher")
    return _launcher.submit(subprocess.Popen, argv, pass_fds=[fd], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, close_fds=True).result()


def _stop(proc: subprocess.Popen, conn: Connection) -> None:
    conn.close()
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(5.0)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not take this long
        pass


class MathVerifier:
    """``math``: 1.0 if the completion's answer is equivalent to ``answer`` (math-verify), else 0.0;
    an ``Excluded`` for a sample whose verification ran past ``timeout_s`` or killed the child.

    Arguments (``reward.function_args.math``): ``timeout_s`` deadline per sample (default 5);
    ``max_chars`` characters verified per side (default 10000, the last ones);
    ``max_memory_mb`` address-space limit of the child (default 4096; 0 = none).
    Calls are serialised; safe from any thread.
    """

    start_timeout_s = 60.0
    """How long a new child may take to import math-verify and say it is ready."""

    def __init__(self, *, timeout_s: float = 5.0, max_chars: int = 10_000, max_memory_mb: int = 4096):
        require(isinstance(timeout_s, (int, float)) and not isinstance(timeout_s, bool)
                and math.isfinite(timeout_s) and timeout_s > 0, "timeout_s", f"a number > 0, got {timeout_s!r}")
        require(_is_int(max_chars) and max_chars >= 1, "max_chars", f"an integer >= 1, got {max_chars!r}")
        require(_is_int(max_memory_mb) and max_memory_mb >= 0, "max_memory_mb",
                f"an integer >= 0 (0 = no limit), got {max_memory_mb!r}")
        self.timeout_s, self.max_chars, self.max_memory_mb = float(timeout_s), max_chars, max_memory_mb
        self._child: _Child | None = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        """The current child's process id; None before the first call and after ``close``."""
        child = self._child
        return child.pid if child is not None else None

    def close(self) -> None:
        """Stop the child (a later call starts a new one)."""
        with self._lock:
            self._drop()

    def __call__(self, prompts: list[str], completions: list[str], *, answer: list, **_) -> list:
        """One score per sample: 1.0 / 0.0, or an ``Excluded`` (timeout, dead child)."""
        results: list = [0.0] * len(completions)
        todo = []
        for i, (c, a) in enumerate(zip(completions, answer)):
            gold, pred = gold_text(a, self.max_chars), prediction_text(c, self.max_chars)
            if gold and pred:
                todo.append((i, gold, pred))
        with self._lock:
            while todo:
                todo = self._run(todo, results)
        return results

    def _run(self, todo: list[tuple[int, str, str]], results: list) -> list[tuple[int, str, str]]:
        """Verify ``todo`` in the child until one sample fails it; returns the samples after that one."""
        try:
            child = self._send([(g, p) for _, g, p in todo])
        except _Died as e:
            self._drop()
            for i, _, _ in todo:
                results[i] = Excluded(Exclusion.REWARD_ERROR, f"math: verifier process {e}")
            return []
        for k, (i, _, _) in enumerate(todo):
            try:
                results[i] = self._verdict(child.wait(self.timeout_s))
            except TimeoutError:
                results[i] = Excluded(Exclusion.REWARD_TIMEOUT, f"math: verification exceeded {self.timeout_s:g}s")
            except _Died as e:
                results[i] = Excluded(Exclusion.REWARD_ERROR, f"math: verifier process died ({e})")
            else:
                continue
            self._drop()
            return todo[k + 1:]
        return []

    @staticmethod
    def _verdict(message) -> float | Excluded:
        if message[0] == "ok":
            return 1.0 if message[1] else 0.0
        return Excluded(Exclusion.REWARD_ERROR, f"math: verification raised {message[1]}")

    def _send(self, batch: list[tuple[str, str]]) -> _Child:
        """The child that got ``batch``; one that died since the last call is replaced once."""
        child = self._started()
        try:
            child.send(batch)
        except _Died:
            self._drop()
            child = self._started()
            child.send(batch)
        return child

    def _started(self) -> _Child:
        if self._child is not None and not self._child.alive():
            self._drop()
        if self._child is None:
            self._child = _Child(self.start_timeout_s, self.max_memory_mb)
        return self._child

    def _drop(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            child.stop()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
