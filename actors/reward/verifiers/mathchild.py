"""The math verifier's child process: answer equivalence with HF's ``math_verify``.

``mathverify.MathVerifier`` starts the child as a fresh interpreter
(``python -c "...; mathchild.main(fd, parent_pid, max_memory_mb)"``) with one end of
a socket pair as ``fd``, which ``main`` wraps in a ``multiprocessing.connection``
Connection. Protocol on it:

* child -> parent, once: ``("ready",)`` after imports and a warm-up verification;
* parent -> child: a batch, ``list[tuple[gold, prediction]]`` of str;
* child -> parent, per item in order: ``("ok", bool)`` (equivalent or not) or
  ``("error", exception type name)``.

The child has no deadline of its own (math_verify's ``signal.alarm`` timeouts are
switched off): the parent waits per item and kills the child when one runs
past it. The child exits when the parent closes the connection, is killed by
the kernel when the parent's launcher thread ends (``PR_SET_PDEATHSIG``, Linux),
and exits (checked every half second) when its parent process is gone. Only
this module imports ``math_verify``.
"""

from __future__ import annotations

import logging
import os
import threading
import time


def equivalent(gold: str, prediction: str) -> bool:
    """True if ``prediction`` states the same answer as ``gold`` (both raw text).

    A gold answer with no math delimiters (``$``, ``\\(``, ``\\[``, ``\\boxed``) is read
    as LaTeX math (``10\\sqrt{2}``, ``(1,2)``, ``x^2+2x+1``); an unparseable gold or
    prediction is not equivalent.
    """
    from math_verify import parse, verify

    gold_parsed = []
    if not any(d in gold for d in ("$", "\\(", "\\[", "\\boxed")):
        gold_parsed = parse(f"${gold}$", parsing_timeout=None)
    gold_parsed = gold_parsed or parse(gold, parsing_timeout=None)
    if not gold_parsed:
        return False
    pred_parsed = parse(prediction, parsing_timeout=None)
    return bool(pred_parsed) and bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def main(fd: int, parent_pid: int, max_memory_mb: int = 0) -> None:
    """The child's entry point: serve the parent on the connected socket ``fd``."""
    from multiprocessing.connection import Connection

    serve(Connection(fd), parent_pid, max_memory_mb)


def serve(conn, parent_pid: int, max_memory_mb: int = 0) -> None:
    """The child's loop (see the module docstring); returns when the parent closes ``conn``."""
    if max_memory_mb:
        import resource

        limit = max_memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled": the parent's deadline is
    _die_with_parent()
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    equivalent("1", "1")  # imports and compiles the extraction regexes before the first deadline
    conn.send(("ready",))
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):
            return
        for gold, prediction in batch:
            conn.send(_verdict(gold, prediction))


def _verdict(gold: str, prediction: str) -> tuple:
    try:
        return ("ok", equivalent(gold, prediction))
    except Exception as e:  # noqa: BLE001 - printing e itself may hang on a huge expression
        return ("error", type(e).__name__)


def _die_with_parent() -> None:
    """Linux: the kernel SIGKILLs this process when the parent thread that started it ends
    (``mathverify`` starts children from one thread that lives as long as the process). Works
    while a verification holds the GIL in C, where the polling thread below cannot run."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the polling thread alone
        pass


def _exit_with_parent(parent_pid: int) -> None:
    """Exit once the parent process is gone (also covers a parent that died before the prctl)."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)
