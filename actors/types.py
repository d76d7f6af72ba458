"""Data that flows from rollout workers through reward workers to the learner.

Plain dataclasses of Python lists: cheap to pickle through Ray for the sizes we
move (token ids and one float per generated token), and readable in tests.

Vocabulary (see the README glossary):
  *sample*  one completion of one prompt, with its behaviour log-probs and the
            ``policy_version`` of the weights that generated it;
  *group*   the ``n`` samples of one prompt (GRPO/RLOO compare within a group).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


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
    excluded: str | None = None
    """Why this sample must not be trained on (reward error, NaN, ...); None = ok."""

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
    excluded: str | None = None
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
