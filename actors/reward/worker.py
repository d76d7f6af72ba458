"""Reward worker: scores groups with one or more reward functions.

A reward function is a plain callable
``fn(prompts: list[str], completions: list[str], **metadata) -> list[float]``
where each metadata key (e.g. ``answer``) arrives as a list aligned with
``prompts``. Configure it as ``"module:function"`` or a built-in alias, its
keyword arguments in ``reward.function_args``. A function may return an
``Excluded`` for a sample it could not score (the math verifier's timeout).

Failures never become a silent 0.0: a function that raises, returns the wrong
number of values or a value that is not a finite number marks the affected
samples ``excluded`` (an ``actors.types.Excluded``: kind + detail), and they
are counted as dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from actors.reward.functions import RewardFn, check_function_args, load_reward_fn
from actors.reward.scores import ScoreBatch, check_results, raised, validate_scores
from actors.types import Excluded, Group
from actors.validation import require


@dataclass(kw_only=True)
class RewardConfig:
    num_workers: int = 1
    """Number of reward workers (Ray actors)."""
    num_cpus: float = 0.2
    """CPUs Ray reserves for each reward worker."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources each reward worker needs."""
    functions: list[str] = field(default_factory=lambda: ["exact_match"])
    """Reward functions: built-in names (exact_match, arithmetic, math, regex, format, length) or
    ``module:function``."""
    function_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Keyword arguments of reward functions, keyed by the name as written in ``functions``, e.g.
    ``{regex: {pattern: "#### (?P<answer>\\d+)"}, math: {timeout_s: 5}}``. ``regex`` needs ``pattern``;
    ``math`` takes ``timeout_s`` (5), ``max_chars`` (10000), ``max_memory_mb`` (4096); ``format``
    ``template`` (``<think>…</think><answer>…</answer>``); ``length`` ``max_chars`` (1000),
    ``penalty_chars`` (1000). A ``module:function`` gets them as keyword arguments (a class: of its
    constructor). Unknown arguments, and keys naming no configured function, are errors."""
    weights: list[float] = field(default_factory=list)
    """Weight of each function in the combined reward; empty = all 1.0."""
    max_replacements: int = 10
    """Reward workers that may die and be replaced during a run before it fails."""
    colocate: bool = False
    """Score the configured functions inside each rollout worker and put the groups straight into
    the coordinator (no hop through a reward worker; for cheap rule rewards). While reward models
    registered over Control are enabled, groups go through the reward workers as without it (they
    hold the models)."""
    model_disable_after_s: float = 0.0
    """A registered reward model that stays unhealthy (circuit open, or its actor dead) this long is
    disabled: the run goes on with the other reward terms; until then rollout pauses. 0 = a quarter of
    train.sample_timeout_s (30 s by default)."""

    def __post_init__(self):
        require(self.num_workers >= 1, "reward.num_workers", "must be >= 1")
        require(self.num_cpus >= 0, "reward.num_cpus", "must be >= 0")
        require(self.max_replacements >= 0, "reward.max_replacements", "must be >= 0")
        require(self.model_disable_after_s >= 0, "reward.model_disable_after_s", "must be >= 0 (0 = automatic)")
        require(bool(self.functions), "reward.functions", "at least one reward function is required")
        require(not self.weights or len(self.weights) == len(self.functions), "reward.weights",
                f"{len(self.weights)} weights for {len(self.functions)} functions")
        check_function_args(self.functions, self.function_args)


class RewardWorker:
    """Scores every sample of a list of groups; sets ``reward`` or ``excluded``.

    ``functions`` are local callables; their output goes through
    ``validate_scores`` here. ``set_models`` adds reward models registered at
    run time (remote servers, local checkpoints): each is ``(name, weight,
    submit)`` where ``submit(batch)`` (a ``ScoreBatch``) starts scoring and
    returns a zero-argument callable that waits for the result. A model's
    result is already validated by the model (per sample a finite float or an
    ``Excluded``); here only its shape is checked. All models are submitted
    before the local functions run, so they score concurrently.
    """

    def __init__(self, functions: list[tuple[str, RewardFn, float]]):
        if not functions:
            raise ValueError("RewardWorker needs at least one reward function")
        self.functions = functions
        self.models: list[tuple[str, float, Callable]] = []
        self.errors = 0

    @classmethod
    def from_config(cls, cfg: RewardConfig) -> "RewardWorker":
        weights = cfg.weights or [1.0] * len(cfg.functions)
        return cls([(spec, load_reward_fn(spec, cfg.function_args.get(spec)), w)
                    for spec, w in zip(cfg.functions, weights)])

    def set_models(self, models: list[tuple[str, float, Callable]]) -> None:
        """Replace the run-time reward models; takes effect at the next ``score``."""
        names = [m[0] for m in models] + [f[0] for f in self.functions]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate reward names in {names}")
        self.models = list(models)

    def score(self, groups: list[Group]) -> list[Group]:
        flat = [(g, s) for g in groups if g.excluded is None for s in g.samples if s.excluded is None]
        if not flat:
            return groups
        batch = ScoreBatch.of(flat)
        models = list(self.models)  # a concurrent set_models must not change this batch
        waiting = []
        for name, _, submit in models:
            try:
                waiting.append((name, submit(batch)))
            except Exception as e:  # noqa: BLE001
                waiting.append((name, _raiser(e)))
        for name, fn, _ in self.functions:
            try:
                results = validate_scores(name, fn(batch.prompts, batch.completions, **batch.metadata), len(flat))
            except Exception as e:  # a user function may raise anything
                results = raised(name, e, len(flat))
            self._apply(name, flat, results)
        for name, wait in waiting:
            try:
                results = check_results(name, wait(), len(flat))
            except Exception as e:  # noqa: BLE001 - e.g. the model's actor died
                results = raised(name, e, len(flat))
            self._apply(name, flat, results)
        weights = {name: w for name, _, w in self.functions} | {name: w for name, w, _ in models}
        for _, s in flat:
            if s.excluded is None:
                s.reward = sum(weights[name] * s.rewards[name] for name in weights)
        return groups

    def _apply(self, name: str, flat, results) -> None:
        for (_, s), r in zip(flat, results):
            if isinstance(r, Excluded):
                if s.excluded is None:
                    s.excluded = r
                    self.errors += 1
            else:
                s.rewards[name] = r


def _raiser(e: Exception):
    def wait():
        raise e

    return wait
