"""Reward worker: scores groups with one or more reward functions.

A reward function is a plain callable
``fn(prompts: list[str], completions: list[str], **metadata) -> list[float]``
where each metadata key (e.g. ``answer``) arrives as a list aligned with
``prompts``. Configure it as ``"module:function"`` or a built-in alias.

Failures never become a silent 0.0: a function that raises, returns the wrong
number of values or a value that is not a finite number marks the affected
samples ``excluded`` with the reason, and they are counted as dropped.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Callable

from actors.types import Group

RewardFn = Callable[..., list[float]]

BUILTIN_REWARDS = {"exact_match": "actors.tasks:exact_match_reward"}


@dataclass(kw_only=True)
class RewardConfig:
    num_workers: int = 1
    """Number of reward workers (Ray actors)."""
    num_cpus: float = 0.2
    """CPUs Ray reserves for each reward worker."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each reward worker needs."""
    functions: list[str] = field(default_factory=lambda: ["exact_match"])
    """Reward functions: built-in names (exact_match) or ``module:function``."""
    weights: list[float] = field(default_factory=list)
    """Weight of each function in the combined reward; empty = all 1.0."""

    def __post_init__(self):
        if self.num_workers < 1:
            raise ValueError("reward.num_workers: must be >= 1")
        if self.num_cpus < 0:
            raise ValueError("reward.num_cpus: must be >= 0")
        if not self.functions:
            raise ValueError("reward.functions: at least one reward function is required")
        if self.weights and len(self.weights) != len(self.functions):
            raise ValueError(f"reward.weights: {len(self.weights)} weights for {len(self.functions)} functions")


def load_reward_fn(spec: str) -> RewardFn:
    """Resolve ``"module:function"`` (or a built-in alias) to a callable."""
    target = BUILTIN_REWARDS.get(spec, spec)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward.functions: {spec!r} is neither a built-in "
                         f"({', '.join(BUILTIN_REWARDS)}) nor 'module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"reward.functions: cannot load {spec!r}: {e}") from None
    if not callable(fn):
        raise ValueError(f"reward.functions: {spec!r} is not callable")
    return fn


def _validate_scores(name: str, scores, n: int) -> list[float | str]:
    """Per sample: a finite float, or a string saying why it is unusable."""
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


class RewardWorker:
    """Scores every sample of a list of groups; sets ``reward`` or ``excluded``."""

    def __init__(self, functions: list[tuple[str, RewardFn, float]]):
        if not functions:
            raise ValueError("RewardWorker needs at least one reward function")
        self.functions = functions
        self.errors = 0

    @classmethod
    def from_config(cls, cfg: RewardConfig) -> "RewardWorker":
        weights = cfg.weights or [1.0] * len(cfg.functions)
        return cls([(spec, load_reward_fn(spec), w) for spec, w in zip(cfg.functions, weights)])

    def score(self, groups: list[Group]) -> list[Group]:
        flat = [(g, s) for g in groups if g.excluded is None for s in g.samples if s.excluded is None]
        if not flat:
            return groups
        prompts = [g.prompt.text for g, _ in flat]
        completions = [s.completion_text for _, s in flat]
        keys = sorted({k for g, _ in flat for k in g.prompt.metadata})
        metadata = {k: [g.prompt.metadata.get(k) for g, _ in flat] for k in keys}
        for name, fn, weight in self.functions:
            try:
                results = _validate_scores(name, fn(prompts, completions, **metadata), len(flat))
            except Exception as e:  # a user function may raise anything
                results = [f"reward_error: {name!r} raised {type(e).__name__}: {e}"] * len(flat)
            for (_, s), r in zip(flat, results):
                if isinstance(r, str):
                    if s.excluded is None:
                        s.excluded = r
                        self.errors += 1
                else:
                    s.rewards[name] = r
        for _, s in flat:
            if s.excluded is None:
                s.reward = sum(w * s.rewards[name] for name, _, w in self.functions)
        return groups
