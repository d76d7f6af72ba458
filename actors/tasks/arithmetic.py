"""Integer arithmetic with a strict answer format (chat prompts for a pretrained policy)."""

from __future__ import annotations

import random
import re

from actors.tasks.base import Task
from actors.tasks.chat import ChatTemplate
from actors.validation import require


class Arithmetic(Task):
    """Integer arithmetic, ``a OP b`` with ``a`` of ``operand_digits[0]`` digits and ``b``
    of ``operand_digits[1]``; for ``-`` the larger operand comes first (no negative results).

    Bare prompt ``"82 + 3 ="``; chat instruction ``"Compute 82 + 3. Reply with only
    the result."`` The answer format (``arithmetic_reward``): one line, the number,
    optionally after text that ends in ``=`` (``"85"``, ``"82 + 3 = 85"``), at most
    a final period; the number must be right. Explanations that run on, several
    numbers after ``=`` or several lines score 0. The held-out eighth is chosen by a hash of
    the problem ``"a op b"``.
    """

    name = "arithmetic"
    reward = "arithmetic"
    OPERATIONS = ("+", "-", "*")

    def __init__(self, operand_digits: tuple[int, int] = (2, 2), operations: tuple[str, ...] = ("+",),
                 seed: int = 0, chat: ChatTemplate | None = None):
        operand_digits, operations = tuple(operand_digits), tuple(operations)
        self.check(operand_digits, operations)
        super().__init__(seed, chat)
        self.operand_digits = operand_digits
        self.operations = operations

    @classmethod
    def check(cls, operand_digits, operations) -> None:
        """ConfigError naming the config key if the task parameters are invalid."""
        require(len(operand_digits) == 2 and all(1 <= d <= 9 for d in operand_digits), "task.operand_digits",
                f"two digit counts in 1..9, got {list(operand_digits)}")
        require(bool(operations) and all(op in cls.OPERATIONS for op in operations)
                and len(set(operations)) == len(operations), "task.operations",
                f"a non-empty list of distinct {list(cls.OPERATIONS)}, got {list(operations)}")

    @property
    def max_new_tokens(self) -> int:
        """Room for the restated form: both operands, the operator, "=", the result
        (digits are single tokens in SmolLM2's tokenizer), spaces and EOS."""
        result_digits = max(self.operand_digits) + 1 if "*" not in self.operations else sum(self.operand_digits)
        return sum(self.operand_digits) + result_digits + 6

    def _operand(self, rng: random.Random, digits: int) -> int:
        return rng.randint(10 ** (digits - 1) if digits > 1 else 1, 10**digits - 1)

    def _problem(self, rng: random.Random) -> tuple[str, str, str, str]:
        a = self._operand(rng, self.operand_digits[0])
        b = self._operand(rng, self.operand_digits[1])
        op = rng.choice(self.operations)
        if op == "-" and b > a:
            a, b = b, a
        expr = f"{a} {op} {b}"
        value = a + b if op == "+" else a - b if op == "-" else a * b
        return expr, f"{expr} =", f"Compute {expr}. Reply with only the result.", str(value)

    # -- verifier ------------------------------------------------------------------
    _REPLY = re.compile(r"(?:[^=\n]*=[ \t]*)?(-?\d+)\.?")

    @classmethod
    def parse(cls, completion: str) -> int | None:
        """The number a reply gives, or None if the reply does not have the answer format."""
        m = cls._REPLY.fullmatch(completion.strip())
        return int(m.group(1)) if m else None

    @classmethod
    def verify(cls, completion: str, answer: str) -> float:
        value = cls.parse(completion)
        return 1.0 if value is not None and value == int(answer) else 0.0
