"""Reward functions the tests name in ``reward.functions`` (``tests.rewards:NAME``).

Plain Python with no imports of fleetrl, torch or transformers: a reward actor
imports the module a reward function lives in, and these modules keep that
import cheap (a test module that imports the trainer made every reward actor of
the suite import torch).
"""

import time


def digit_reward(prompts, completions, **_):
    """A dense reward a random policy can climb: the fraction of digits in the completion."""
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) if c else 0.0 for c in completions]


def flaky_reward(prompts, completions, *, answer, **_):
    """NaN for prompts whose answer starts with an odd digit, else 0.5."""
    return [float("nan") if int(a[0]) % 2 else 0.5 for a in answer]


def always_raises(prompts, completions, **_):
    raise RuntimeError("reward service unavailable")


def slow_exact(prompts, completions, *, answer, **_):
    """exact_match, 0.4 s per call: steps slow enough for a test to look at the run and kill it."""
    time.sleep(0.4)
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]


def slow_reward(prompts, completions, **_):
    """1.5 s per call: a graceful stop has to wait for the reward calls in flight."""
    time.sleep(1.5)
    return [0.5] * len(completions)


def half_constant_reward(prompts, completions, *, answer, **_):
    """0.5 for every completion of a prompt whose answer starts with an odd digit (a group
    with nothing to learn from: filter_equal_groups must leave it out), else the digit fraction."""
    return [0.5 if int(a[0]) % 2 else sum(ch.isdigit() for ch in c) / max(1, len(c)) for a, c in zip(answer, completions)]


def brevity(prompts, completions, **_):
    """A dense reward (shorter is better) so that every group has a learning signal."""
    return [-len(c) / 64 for c in completions]


def pid_reward(prompts, completions, **_):
    """The scoring process's pid as every sample's reward: where the reward ran."""
    import os

    return [float(os.getpid())] * len(completions)
