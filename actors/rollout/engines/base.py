"""What every rollout engine implements, and what it returns.

The rollout worker talks to its engine through ``Engine`` only, so the loop,
accounting, staleness, replacement, scaling and both weight-sync transports
are the same whichever engine generates. Pure Python + torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol, Sequence

import torch


@dataclass(frozen=True)
class Completion:
    """One generated completion, as the engine returns it."""

    ids: list[int]
    """Token ids, up to and including EOS when the policy stopped."""
    logprobs: list[float]
    """Behaviour log-prob of each token in ``ids`` (the sampling distribution after
    temperature; README glossary)."""
    finished: bool
    """True when the completion ended with EOS."""
    stopped: bool = False
    """True when it ended at one of the call's ``stop`` strings (included in ``ids``); a completion
    neither finished nor stopped was cut at ``max_new_tokens``."""


class Engine(Protocol):
    """A generation backend inside one rollout worker."""

    name: str
    """``hf`` or ``vllm`` (the ``rollout.engine`` value)."""
    context: int
    """Most prompt + completion tokens one sequence may hold."""

    def generate(self, prompt_ids: list[list[int]], *, n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int, stop: Sequence[str] = ()) -> list[list[Completion]]:
        """``n`` completions per prompt (``[len(prompt_ids)][n]``), seeded by ``seed`` alone;
        ``temperature == 0`` is greedy. A completion also ends after the first token that
        completes one of the ``stop`` strings (a tool call's closing tag: multi-turn episodes)."""
        ...

    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Take new weights (Hugging Face parameter names). The worker calls it only between
        generate calls, after its flat buffers hold the new version."""
        ...

    def info(self) -> dict:
        """What the engine holds: its name, device, dtype and engine-specific settings."""
        ...
