"""A whole training run: one Trainer, or several when ``train.max_restarts`` lets it restart.

A run whose learner or coordinator dies ends its *segment* (the trainer saves
what it can and writes ``summary.json`` with ``status: failed``); with restarts
left, every actor of the segment is killed and a new segment starts from the
run directory's newest checkpoint (from the start if there is none), with new
actors; the reward models registered over Control are registered again. Each
segment's counters are kept (``summary.json`` ``segments``), so
``produced == trained + dropped`` holds for the run as a whole. Other failures
(a reward function that always raises, an unplaceable actor...) would fail
again the same way and are not restarted.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
from pathlib import Path

from learner import checkpoint
from learner.config import Config
from learner.driver.errors import RunFailed
from learner.driver.trainer import Trainer


def _has_checkpoint(run_dir: Path) -> bool:
    return bool(checkpoint.complete_checkpoints(run_dir))


def run_training(cfg: Config, run_dir: str | Path, *, out=sys.stdout, progress: bool = True,
                 stop_requested: threading.Event | None = None, on_trainer=None, trainer_cls=Trainer) -> dict:
    """Train, restarting up to ``train.max_restarts`` times after a learner or coordinator
    death; returns the summary, or raises the last ``RunFailed`` (its summary written).
    ``on_trainer(trainer)`` is called with each segment's trainer (tests, the chaos bench)."""
    stop_requested = stop_requested or threading.Event()
    segments: list[dict] = []
    eval_before, models = None, []
    while True:
        seg_cfg = cfg
        if segments:
            resume = "auto" if _has_checkpoint(run_dir) else cfg.train.resume  # where the run itself began
            seg_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=resume))
        trainer = trainer_cls(seg_cfg, run_dir, out=out, progress=progress, stop_requested=stop_requested,
                          segments=segments, eval_before=eval_before, reward_models=models)
        if on_trainer is not None:
            on_trainer(trainer)
        try:
            return trainer.train()
        except RunFailed as e:
            if not e.restartable or len(segments) >= cfg.train.max_restarts or stop_requested.is_set():
                raise
            segments = list(trainer.segments) + [trainer.summary["segments"][-1]]
            eval_before = trainer.eval_before
            models = trainer.final_models
            print(f"restart {len(segments)}/{cfg.train.max_restarts} after: {e}; resuming from "
                  f"{'the newest checkpoint' if _has_checkpoint(run_dir) else 'the start (no checkpoint yet)'}",
                  file=out, flush=True)
        finally:
            trainer.shutdown()
