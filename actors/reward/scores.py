"""The one score validator: every reward source's output passes through it.

In-process functions, local HF models, remote servers (client side) and
``fleetrl reward serve`` (server side) all call ``validate_scores``: per
sample a finite float, or the reason the sample has none. A failure is never
turned into a score.
"""

from __future__ import annotations

import math


def validate_scores(name: str, scores, n: int) -> list[float | str]:
    """Per sample: a finite float, or a string saying why it is unusable (the one
    check every reward source goes through: functions, remote and local models)."""
    try:
        values = list(scores)
    except TypeError:
        return [f"reward_invalid: {name!r} returned {type(scores).__name__}, not a list of floats"] * n
    if len(values) != n:
        return [f"reward_count: {name!r} returned {len(values)} scores for {n} samples"] * n
    out: list[float | str] = []
    for v in values:
        try:
            f = float(v)
        except (TypeError, ValueError):
            out.append(f"reward_invalid: {name!r} returned non-numeric {v!r}")
            continue
        out.append(f if math.isfinite(f) else f"reward_nonfinite: {name!r} returned {f}")
    return out
