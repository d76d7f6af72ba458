"""Reward functions: the built-in verifiers and loading ``module:function`` by name.

A reward function is a plain callable
``fn(prompts: list[str], completions: list[str], **metadata) -> list[float]``
where each metadata key (e.g. ``answer``) arrives as a list aligned with
``prompts``. In place of a float, a function may return an
``actors.types.Excluded`` for a sample it could not score (e.g.
``Excluded(Exclusion.REWARD_TIMEOUT, "math: verification exceeded 5s")``):
that sample is excluded, never scored 0.0 (``scores.validate_scores`` passes it
through unchanged).

``reward.functions`` names built-ins (``BUILTIN_REWARDS``: exact_match,
arithmetic, multiply, math, regex, format, length; the verifiers live in
``actors.reward.verifiers``) or ``module:function``. ``reward.function_args``
gives a function keyword arguments, keyed by its name as written in
``reward.functions`` (``load_reward_fn(spec, args)``): a target that is a class
is a factory, instantiated once with them (``Cls(**args)`` is the reward
function); a plain function gets them bound (``functools.partial``) and takes
those of its keyword parameters that have a default. An argument the target
does not take is a ``ConfigError``
(``reward.function_args.regex.patern: unknown argument (known: pattern)``).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, Callable, Mapping

from actors.reward.verifiers.text import exact_match
from actors.tasks.arithmetic import Arithmetic
from actors.tasks.multiply import Multiply
from actors.validation import ConfigError, require

RewardFn = Callable[..., list[float]]

BUILTIN_REWARDS = {"exact_match": "actors.reward.functions:exact_match_reward",
                   "arithmetic": "actors.reward.functions:arithmetic_reward",
                   "multiply": "actors.reward.functions:multiply_reward",
                   "math": "actors.reward.verifiers.mathverify:MathVerifier",
                   "regex": "actors.reward.verifiers.text:Regex",
                   "format": "actors.reward.verifiers.text:Format",
                   "length": "actors.reward.verifiers.text:Length"}

_CALL_PARAMS = ("prompts", "completions")


def load_reward_fn(spec: str, args: Mapping[str, Any] | None = None) -> RewardFn:
    """Resolve ``"module:function"`` (or a built-in alias) to a reward function, with ``args``
    (its ``reward.function_args`` entry) bound; see the module docstring."""
    target = _resolve(spec)
    key = f"reward.function_args.{spec}"
    args = dict(args or {})
    if inspect.isclass(target):
        fn = _construct(key, target, args)
    elif args:
        _check_args(key, target, args, skip=_CALL_PARAMS)
        fn = functools.partial(target, **args)
    else:
        fn = target
    if not callable(fn):
        raise ConfigError(f"reward.functions: {spec!r} is not callable")
    return fn


def check_function_args(functions: list[str], function_args: Mapping[str, Any]) -> None:
    """``reward.function_args``: every key names a configured function and maps to a mapping of
    argument names; the built-ins' arguments are checked here too (user functions when loaded)."""
    for name, args in function_args.items():
        require(name in functions, f"reward.function_args.{name}",
                f"names no function in reward.functions (configured: {', '.join(functions)})")
        require(isinstance(args, Mapping) and all(isinstance(k, str) for k in args),
                f"reward.function_args.{name}", f"expected a mapping of argument names to values, got {args!r}")
    for name in functions:
        if name in BUILTIN_REWARDS:
            close(load_reward_fn(name, function_args.get(name)))


def close(fn: RewardFn) -> None:
    """Release what a loaded reward function holds (e.g. the math verifier's child process)."""
    stop = getattr(fn, "close", None)
    if callable(stop):
        stop()


def _resolve(spec: str):
    target = BUILTIN_REWARDS.get(spec, spec)
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"reward.functions: {spec!r} is neither a built-in "
                          f"({', '.join(BUILTIN_REWARDS)}) nor 'module:function'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"reward.functions: cannot load {spec!r}: {e}") from None


def _construct(key: str, cls: type, args: dict):
    known = _check_args(key, cls, args, skip=())
    try:
        return cls(**args)
    except ConfigError as e:  # a verifier's own check: "pattern: invalid regular expression ..."
        arg = str(e).partition(":")[0]
        raise ConfigError(f"{key}.{e}" if arg in known else f"{key}: {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key}: {e}") from None


def _check_args(key: str, target, args: dict, skip: tuple[str, ...]) -> list[str]:
    """The arguments ``target`` takes by keyword (less ``skip``): a class's constructor arguments;
    a function's parameters with a default (one without, like ``answer``, is metadata). ConfigError
    for an unknown one, or for a required argument of a class that ``args`` lacks."""
    try:
        params = [p for p in inspect.signature(target).parameters.values()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in skip
                  and (inspect.isclass(target) or p.default is not p.empty)]
    except (TypeError, ValueError):  # no signature to inspect (a builtin)
        params = []
    known = [p.name for p in params]
    for name in args:
        require(name in known, f"{key}.{name}", f"unknown argument (known: {', '.join(known) or 'none'})")
    if inspect.isclass(target):
        for p in params:
            require(p.name in args or p.default is not p.empty, f"{key}.{p.name}", "required (no default)")
    return known


def exact_match_reward(prompts: list[str], completions: list[str], *, answer: list[str], **_) -> list[float]:
    """1.0 if the completion equals ``answer`` after normalisation (strip, collapse whitespace,
    case-fold, one trailing period; numbers by value unless a leading zero makes them digit
    strings: ``"1,000" == "1000"``, ``"0123" != "123"``); see ``actors.reward.verifiers.text``."""
    return exact_match(prompts, completions, answer=answer)


def arithmetic_reward(prompts: list[str], completions: list[str], *, answer: list[str], **_) -> list[float]:
    """Verifier reward of the arithmetic task: 1.0 if the reply has the answer format
    (``"85"`` or ``"82 + 3 = 85"``, see ``Arithmetic``) and its number is ``answer``."""
    return [Arithmetic.verify(c, a) for c, a in zip(completions, answer)]


def multiply_reward(prompts: list[str], completions: list[str], *, answer: list[str], **_) -> list[float]:
    """Verifier reward of the multiply task: 1.0 if the episode's last turn ends with
    ``Answer: N`` (or ``N``), makes no more tool calls, and ``N`` is the product."""
    return [Multiply.verify(c, a) for c, a in zip(completions, answer)]
