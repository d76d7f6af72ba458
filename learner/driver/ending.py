"""How a run ends when it does not simply finish: failures named, counters closed, what can be saved.

Functions of a ``Trainer`` (``trainer.py`` calls them): ``failure_from`` turns a
Ray error into a ``RunFailed`` naming a dead learner or coordinator,
``unexpected`` turns any other exception into one line (the traceback goes to
``RUN_DIR/error.log``), ``wind_down`` stops generation and returns the final
counters within ``train.stop_timeout_s``, and ``save_what_can_be_saved`` writes
a checkpoint after a failure when one can be consistent.
"""

from __future__ import annotations

from pathlib import Path

import ray

from learner.driver.errors import RunFailed
from learner.driver.report import lost_coordinator_stats


def failure_from(trainer, e: ray.exceptions.RayError, what: str = "") -> RunFailed:
    """A Ray error as a ``RunFailed`` naming the dead learner or coordinator if one died."""
    try:
        if trainer.supervisor is not None:
            trainer.supervisor.check_core(timeout_s=10.0)
    except RunFailed as died:
        return died
    cause = e.as_instanceof_cause() if isinstance(e, ray.exceptions.RayTaskError) else e
    last = str(cause).strip().splitlines()[-1][:300] if str(cause).strip() else ""
    return RunFailed(f"{what or f'step {trainer.step + 1}'}: {type(cause).__name__}: {last}")


def unexpected(run_dir: Path, e: Exception) -> RunFailed:
    """An error no part of the run should raise: one line, the traceback in ``error.log``."""
    import traceback

    path = run_dir / "error.log"
    path.write_text("".join(traceback.format_exception(e)))
    return RunFailed(f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''} "
                     f"(traceback in {path})")


def wind_down(trainer) -> dict:
    """Stop generation and return the final counters, within ``train.stop_timeout_s``.
    With the coordinator dead, the counters of the last publish, what was buffered
    then counted as dropped (``coordinator_lost``)."""
    timeout_s = trainer.cfg.train.stop_timeout_s
    stats = None
    if "coordinator" not in trainer.supervisor.dead:
        try:
            stats = trainer.stop_rollouts(timeout_s) if trainer.rollouts.started else \
                ray.get(trainer.coordinator.stats.remote(), timeout=timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass
    if stats is None:
        stats = lost_coordinator_stats(trainer.counters)
    trainer.final_models = trainer.registry.enabled_specs() if trainer.registry is not None else []
    trainer.stop_control()
    return stats


def save_what_can_be_saved(trainer, failure: RunFailed) -> None:
    """After a failure: a checkpoint of the last completed step, if the learner is alive
    and still at that step (a failed sync may have left it one update ahead)."""
    if "learner" in trainer.supervisor.dead or not trainer.counters:
        return
    try:
        version = ray.get(trainer.learner.version.remote(), timeout=10)
        if version != trainer.counters.get("policy_version") or version != trainer.step:
            trainer.say(f"no final checkpoint: the learner is at version {version}, the last completed step "
                        f"is {trainer.step}")
            return
        path = trainer.save_checkpoint(timeout_s=trainer.cfg.train.stop_timeout_s)
        trainer.say(f"checkpoint of step {trainer.step} written to {path}")
    except (ray.exceptions.RayError, OSError) as e:
        trainer.say(f"no final checkpoint: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
