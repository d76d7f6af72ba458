"""Built-in verifiable tasks: prompt streams, labelled sets and verifiers.

A task is deterministic given its seed: the RL prompt stream, the small fixed
labelled set used for the supervised warm start and the held-out evaluation
set are drawn from disjoint parts of the problem space, so held-out accuracy
measures generalisation, not memorisation.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Iterator

from actors.types import Prompt


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


class ReverseDigits:
    """Reverse a string of ``num_digits`` digits: ``"1234="`` -> ``"4321"``.

    Reward is 1.0 for an exact answer (whitespace-trimmed), 0.0 otherwise.
    The held-out set is every string whose hash bucket is 0 (1/8 of the space);
    the labelled set and the RL prompt stream never contain those strings.
    """

    name = "reverse"
    alphabet = "0123456789="

    def __init__(self, num_digits: int = 4, seed: int = 0):
        if num_digits < 1:
            raise ValueError("task.num_digits must be >= 1")
        self.num_digits = num_digits
        self.seed = seed

    # -- problem space -------------------------------------------------------------
    def _is_heldout(self, digits: str) -> bool:
        return zlib.crc32(f"{self.seed}:{digits}".encode()) % 8 == 0

    def _random_digits(self, rng: random.Random) -> str:
        return "".join(rng.choice("0123456789") for _ in range(self.num_digits))

    def example(self, digits: str) -> Example:
        return Example(prompt=f"{digits}=", answer=digits[::-1])

    def _draw(self, rng: random.Random, heldout: bool) -> Example:
        while True:
            d = self._random_digits(rng)
            if self._is_heldout(d) == heldout:
                return self.example(d)

    # -- the three data sets -------------------------------------------------------
    def labelled_set(self, size: int) -> list[Example]:
        """Small fixed labelled set for the supervised warm start."""
        rng = random.Random(f"labelled-{self.seed}")
        return [self._draw(rng, heldout=False) for _ in range(size)]

    def validation_set(self, size: int) -> list[Example]:
        """Early-stopping prompts for the warm start: from the training space, own seed;
        the held-out eval set is never looked at during training."""
        rng = random.Random(f"val-{self.seed}")
        return [self._draw(rng, heldout=False) for _ in range(size)]

    def eval_set(self, size: int) -> list[Example]:
        """Held-out prompts for greedy evaluation (disjoint from everything else)."""
        rng = random.Random(f"eval-{self.seed}")
        return [self._draw(rng, heldout=True) for _ in range(size)]

    def prompt_stream(self, start: int = 0) -> Iterator[Prompt]:
        """Endless stream of fresh RL prompts; ``start`` skips ahead (resume)."""
        rng = random.Random(f"stream-{self.seed}")
        uid = 0
        while True:
            ex = self._draw(rng, heldout=False)
            if uid >= start:
                yield Prompt(uid=uid, text=ex.prompt, metadata={"answer": ex.answer})
            uid += 1

    # -- verifier ------------------------------------------------------------------
    @staticmethod
    def verify(completion: str, answer: str) -> float:
        return 1.0 if completion.strip() == answer else 0.0


TASKS = {ReverseDigits.name: ReverseDigits}


def make_task(name: str, **kwargs) -> ReverseDigits:
    try:
        cls = TASKS[name]
    except KeyError:
        raise ValueError(f"task.name: unknown task {name!r}; known: {sorted(TASKS)}") from None
    return cls(**kwargs)


def exact_match_reward(prompts: list[str], completions: list[str], *, answer: list[str], **_) -> list[float]:
    """Verifier reward for built-in tasks: 1.0 if the completion equals ``answer``."""
    return [ReverseDigits.verify(c, a) for c, a in zip(completions, answer)]
