"""Reward functions: the built-in verifiers and loading ``module:function`` by name.

A reward function is a plain callable
``fn(prompts: list[str], completions: list[str], **metadata) -> list[float]``
where each metadata key (e.g. ``answer``) arrives as a list aligned with
``prompts``. ``reward.functions`` names built-ins (``BUILTIN_REWARDS``) or
``module:function``.
"""

from __future__ import annotations

import importlib
from typing import Callable

from actors.tasks.arithmetic import Arithmetic
from actors.validation import ConfigError
from actors.tasks.reverse import ReverseDigits

RewardFn = Callable[..., list[float]]

BUILTIN_REWARDS = {"exact_match": "actors.reward.functions:exact_match_reward",
                   "arithmetic": "actors.reward.functions:arithmetic_reward"}


def load_reward_fn(spec: str) -> RewardFn:
    """Resolve ``"module:function"`` (or a built-in alias) to a callable."""
    target = BUILTIN_REWARDS.get(spec, spec)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"reward.functions: {spec!r} is neither a built-in "
                         f"({', '.join(BUILTIN_REWARDS)}) nor 'module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"reward.functions: cannot load {spec!r}: {e}") from None
    if not callable(fn):
        raise ConfigError(f"reward.functions: {spec!r} is not callable")
    return fn


def exact_match_reward(prompts: list[str], completions: list[str], *, answer: list[str], **_) -> list[float]:
    """Verifier reward for built-in tasks: 1.0 if the completion equals ``answer``."""
    return [ReverseDigits.verify(c, a) for c, a in zip(completions, answer)]


def arithmetic_reward(prompts: list[str], completions: list[str], *, answer: list[str], **_) -> list[float]:
    """Verifier reward of the arithmetic task: 1.0 if the reply has the answer format
    (``"85"`` or ``"82 + 3 = 85"``, see ``Arithmetic``) and its number is ``answer``."""
    return [Arithmetic.verify(c, a) for c, a in zip(completions, answer)]
