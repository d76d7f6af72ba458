"""What ``fleetrl status`` shows: the fields of ``control.v1.GetStatusResponse`` for a running trainer."""

from __future__ import annotations

import ray

from actors.rollout.evaluate import is_headline

STATUS_EVENTS = 20
"""How many of the latest events ``fleetrl status`` shows."""


def run_status(trainer) -> dict:
    """The coordinator's live counters (the last publish's if it does not answer within 2 s), the
    last step's metrics, the dataset's epoch/position and the latest evaluation."""
    try:
        c = ray.get(trainer.coordinator.stats.remote(), timeout=2.0)
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
        c = trainer.counters or {}
    m = trainer.last_metrics
    events = trainer.supervisor.events if trainer.supervisor else []
    return {"step": trainer.step, "policy_version": c.get("policy_version", 0),
            "samples_per_s": m.get("samples_per_s", 0.0), "rollout_workers": len(trainer.rollouts.live),
            "reward_workers": len(trainer.rewards.actors), "reward_means": m.get("reward_by_name", {}),
            "produced": c.get("produced", 0), "trained": c.get("trained", 0), "dropped": c.get("dropped", 0),
            "dropped_by_reason": c.get("dropped_by_reason", {}), "paused": c.get("paused", ""),
            "events": [e["detail"] for e in events[-STATUS_EVENTS:]],
            "data": c.get("data", {}), "last_eval": status_eval(trainer.evals[-1] if trainer.evals else None)}


def status_eval(m: dict | None) -> dict:
    """An evaluation's numbers as ``control.v1.EvalSummary`` fields (step -1: none yet)."""
    if m is None:
        return {"step": -1}
    flat = {k: float(v) for k, v in m.items() if is_headline(k)}
    for source, sm in m.get("by_source", {}).items():
        flat |= {f"{source}/{k}": float(v) for k, v in sm.items() if is_headline(k)}
    return {"step": m["step"], "policy_version": m.get("policy_version", 0), "metrics": flat}
