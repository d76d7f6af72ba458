"""Data that flows from rollout workers through reward workers to the learner.

Plain dataclasses of Python lists: cheap to pickle through Ray for the sizes we
move (token ids and one float per generated token), and readable in tests.

Vocabulary (see the README glossary):
  *sample*  one completion of one prompt, with its behaviour log-probs and the
            ``policy_version`` of the weights that generated it;
  *group*   the ``n`` samples of one prompt (GRPO/RLOO compare within a group).

Why a sample or group is not trained on is an ``Excluded``: a kind
(``Exclusion``, the counter key in ``dropped_by_reason``) and a free-text
detail, kept apart so nothing parses "kind: text" strings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Exclusion(str, Enum):
    """Why a sample is not trained on; the value is its ``dropped_by_reason`` key."""

    REWARD_ERROR = "reward_error"
    """A reward function or model raised, or its actor died."""
    REWARD_INVALID = "reward_invalid"
    """A score that is not a number (or no list of scores at all)."""
    REWARD_NONFINITE = "reward_nonfinite"
    """A score that is NaN or +-inf."""
    REWARD_COUNT = "reward_count"
    """Not exactly one score per sample."""
    REWARD_TIMEOUT = "reward_timeout"
    """A reward server missed the call's deadline."""
    REWARD_UNAVAILABLE = "reward_unavailable"
    """A reward server could not be reached (after the retries)."""
    REWARD_UNHEALTHY = "reward_unhealthy"
    """A reward model's circuit is open: the call failed fast."""
    PROMPT_TOO_LONG = "prompt_too_long"
    """Prompt tokens + max_new_tokens exceed the policy's context."""
    UNSCORED = "unscored"
    """No reward was set (a reward worker bug)."""
    ENV_ERROR = "env_error"
    """An episode's environment raised (or returned something that is not a ``StepResult``)."""
    ENV_TIMEOUT = "env_timeout"
    """An environment's ``step`` took longer than ``env.step_timeout_s``."""
    ENV_UNKNOWN = "env_unknown"
    """The prompt names an environment that cannot be built (``env.key``)."""


@dataclass(frozen=True)
class Excluded:
    """Why one sample (or a whole group) must not be trained on."""

    kind: Exclusion
    detail: str = ""
    """Human-readable: which function or model, and what it did."""

    def __str__(self) -> str:
        return f"{self.kind.value}: {self.detail}" if self.detail else self.kind.value


@dataclass(kw_only=True)
class Prompt:
    """One prompt handed out by the coordinator."""

    uid: int
    """Sequence number in the prompt stream (unique per run)."""
    text: str
    """The prompt as text, exactly as the policy sees it."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Whatever the reward functions need, e.g. ``{"answer": "4321"}``."""


@dataclass(kw_only=True)
class Sample:
    """One completion of one prompt."""

    completion_ids: list[int]
    """Generated token ids, up to and including EOS when the policy stopped."""
    completion_text: str
    """Decoded completion without special tokens."""
    logprobs: list[float]
    """Behaviour log-prob of each token in ``completion_ids`` (temperature-scaled
    distribution, before top-p truncation), one per token."""
    policy_version: int
    """Version of the weights that generated this sample."""
    finished: bool = True
    """True when the sample ended with EOS, False when cut at max_new_tokens."""
    reward: float | None = None
    """Combined reward; None until scored or when the sample is excluded."""
    rewards: dict[str, float] = field(default_factory=dict)
    """Per reward-function scores (name -> score) that make up ``reward``."""
    excluded: Excluded | None = None
    """Why this sample must not be trained on (reward error, NaN, ...); None = ok."""
    loss_mask: list[int] | None = None
    """Multi-turn episodes: 1 for each token of ``completion_ids`` the policy generated, 0 for the
    environment's observation tokens (context only; their ``logprobs`` entries are 0.0). None = every
    token is the policy's (a single-turn completion)."""
    turns: int = 1
    """Assistant turns in this sample (an episode's; 1 for a single-turn completion)."""
    scored_text: str | None = None
    """What the reward functions score as the completion: an episode's last assistant turn
    (None = ``completion_text``)."""
    metadata: dict[str, Any] = field(default_factory=dict)
    """Per-sample metadata for the reward functions, over the prompt's (an episode's ``finish``:
    ``tool_calls``, ``tool_errors``, ...)."""

    @property
    def policy_tokens(self) -> int:
        return len(self.completion_ids) if self.loss_mask is None else sum(self.loss_mask)

    @property
    def trainable(self) -> bool:
        return self.excluded is None and self.reward is not None and math.isfinite(self.reward)


@dataclass(kw_only=True)
class Group:
    """The ``n`` samples of one prompt."""

    prompt: Prompt
    prompt_ids: list[int]
    samples: list[Sample]
    worker: str = ""
    """Name of the rollout worker that generated the group."""
    excluded: Excluded | None = None
    """Set when the whole group is unusable (e.g. prompt longer than the context)."""

    @property
    def policy_version(self) -> int:
        """All samples of a group come from one generate call, hence one version."""
        return min(s.policy_version for s in self.samples) if self.samples else -1

    def trainable_samples(self) -> list[Sample]:
        if self.excluded is not None:
            return []
        return [s for s in self.samples if s.trainable]

    @property
    def size(self) -> int:
        """Number of trajectories this group accounts for (trained or dropped)."""
        return len(self.samples)
