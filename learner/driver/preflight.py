"""Checks that need no Ray: files and paths a run will read, before anything starts.

A missing ``model.path``, a pickle-only policy without ``model.allow_pickle``,
a missing token file or TLS file, a Control port in use, an output directory
holding an earlier run's checkpoints without ``--resume``, or an unloadable
reward function is a
``ConfigError`` naming the key, in well under a second, instead of a failure
inside an actor after Ray started.
"""

from __future__ import annotations

import socket
from pathlib import Path

from actors.reward.functions import load_reward_fn
from actors.rollout.policy import check_policy_files
from actors.validation import ConfigError, require
from learner.config import Config


def _readable(path: str | None, key: str) -> None:
    if path is None:
        return
    p = Path(path)
    require(p.is_file(), key, f"{path} does not exist or is not a file")
    try:
        require(bool(p.read_bytes().strip()), key, f"{path} is empty")
    except OSError as e:
        raise ConfigError(f"{key}: {path}: {e.strerror or e}") from None


def _bindable(host: str, port: int, key: str) -> None:
    """A fixed port someone else holds fails here, in one line (the real bind later still
    reports a port taken in between)."""
    if not port:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host.strip("[]"), port))
        except OSError as e:
            raise ConfigError(f"{key}: cannot bind {host}:{port}: {e.strerror or e}") from None


def preflight(cfg: Config, run_dir: Path) -> None:
    """Raise ``ConfigError`` for the first file or path of ``cfg`` that cannot work."""
    if cfg.model.path:
        check_policy_files(cfg.model.path, cfg.model.allow_pickle)
    c = cfg.control
    if c.enabled:
        _readable(c.token_file, "control.token_file")
        _readable(c.tls_cert, "control.tls_cert")
        _readable(c.tls_key, "control.tls_key")
        require(bool(c.tls_cert) == bool(c.tls_key), "control.tls_cert", "TLS needs both tls_cert and tls_key")
        _bindable(c.host, c.port, "control.port")
    for spec in cfg.reward.functions:
        load_reward_fn(spec, cfg.reward.function_args.get(spec))
    if cfg.eval.reward:  # the evaluation's verifier: fail here, not inside a rollout actor
        try:
            load_reward_fn(cfg.eval.reward, cfg.reward.function_args.get(cfg.eval.reward))
        except ConfigError as e:
            raise ConfigError(f"eval.reward: {e}") from None
    for key in ("train_files", "eval_files"):  # read in setup; a missing one fails before any actor starts
        for f in getattr(cfg.data, key):
            require(Path(f).exists(), f"data.{key}", f"{f}: no such file or folder")
    if cfg.train.resume and cfg.train.resume != "auto":
        require(Path(cfg.train.resume).is_dir(), "train.resume", f"{cfg.train.resume} is not a directory")
    if not cfg.train.resume:  # a fresh run must not mix with (or prune, or restart from) an earlier one's
        earlier = sorted(p.name for p in (Path(run_dir) / "checkpoints").glob("step-*"))
        require(not earlier, "train.resume", f"{run_dir} holds checkpoints of an earlier run ({earlier[-1] if earlier else ''}"
                f"): pass --resume auto to continue it, or another --output-dir")
