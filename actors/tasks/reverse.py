"""The default task: reverse a string of digits (``"1234="`` -> ``"4321"``)."""

from __future__ import annotations

import random

from actors.tasks.base import Task
from actors.tasks.chat import ChatTemplate
from actors.validation import require


class ReverseDigits(Task):
    """Reverse a string of ``num_digits`` digits: ``"1234="`` -> ``"4321"``.

    Reward is 1.0 for an exact answer (whitespace-trimmed), 0.0 otherwise.
    The held-out set is every string whose hash bucket is 0 (1/8 of the space);
    the labelled set and the RL prompt stream never contain those strings.
    """

    name = "reverse"
    alphabet = "0123456789="

    def __init__(self, num_digits: int = 4, seed: int = 0, chat: ChatTemplate | None = None):
        self.check(num_digits)
        super().__init__(seed, chat)
        self.num_digits = num_digits

    @staticmethod
    def check(num_digits: int) -> None:
        """ConfigError naming the config key if ``num_digits`` is invalid."""
        require(num_digits >= 1, "task.num_digits", "must be >= 1")

    @property
    def max_new_tokens(self) -> int:
        return self.num_digits + 1

    def _problem(self, rng: random.Random) -> tuple[str, str, str, str]:
        d = "".join(rng.choice("0123456789") for _ in range(self.num_digits))
        return d, f"{d}=", f"Reverse the digits of {d}. Reply with only the result.", d[::-1]

    # -- verifier ------------------------------------------------------------------
    @staticmethod
    def verify(completion: str, answer: str) -> float:
        return 1.0 if completion.strip() == answer else 0.0
