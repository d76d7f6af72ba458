"""Multiplication with a calculator: a multi-turn task where the tool is the way to the answer.

``a * b`` with ``a`` and ``b`` of ``operand_digits`` digits (``task.operand_digits``;
``[3, 3]``: a 6-digit product SmolLM2-135M does not get right on its own). The prompt tells the policy
how to call the calculator (``<calculator>EXPRESSION</calculator>``, answered by
``<result>...</result>`` in the next message) and to end with ``Answer: N``.
The task's environment is ``calculator`` (``actors.envs``), its verifier
``multiply_reward``: 1.0 when the episode's last turn ends with ``Answer: N`` (or
just ``N``) and ``N`` is the product; the number of tool calls does not matter.
"""

from __future__ import annotations

import random
import re

from actors.tasks.base import Task
from actors.tasks.chat import ChatTemplate
from actors.validation import require

SYSTEM = ("You can use a calculator. To use it, write <calculator>EXPRESSION</calculator> and stop; "
          "the result comes back as <result>VALUE</result>. When you know the answer, reply with "
          "'Answer: ' followed by the number.")
"""The instruction every prompt carries (the system message with a chat template)."""

SHOTS = [{"role": "user", "content": "What is 12 * 34?"},
         {"role": "assistant", "content": "<calculator>12 * 34</calculator>"},
         {"role": "tool", "content": "<result>408</result>"},
         {"role": "assistant", "content": "Answer: 408"}]
"""One solved example before the question (chat prompts): the call, the result, the answer."""


class Multiply(Task):
    name = "multiply"
    reward = "multiply"
    env = "calculator"

    def __init__(self, operand_digits: tuple[int, int] = (3, 3), seed: int = 0, chat: ChatTemplate | None = None):
        operand_digits = tuple(operand_digits)
        require(len(operand_digits) == 2 and all(1 <= d <= 9 for d in operand_digits), "task.operand_digits",
                f"two digit counts in 1..9, got {list(operand_digits)}")
        super().__init__(seed, chat)
        self.operand_digits = operand_digits

    @property
    def max_new_tokens(self) -> int:
        """One turn: a call with both operands, or the answer line (SmolLM2 writes digits one token each)."""
        return sum(self.operand_digits) * 2 + 24

    def _problem(self, rng: random.Random) -> tuple[str, str, str, str]:
        a, b = (rng.randint(10 ** (d - 1) if d > 1 else 1, 10**d - 1) for d in self.operand_digits)
        question = f"What is {a} * {b}?"
        bare = f"{SYSTEM}\nQuestion: What is 12 * 34?\n<calculator>12 * 34</calculator>\n<result>408</result>\n" \
               f"Answer: 408\nQuestion: {question}\n"
        return f"{a}*{b}", bare, question, str(a * b)

    def _render(self, instruction: str) -> str:
        return self.chat.render(instruction, system=SYSTEM, shots=SHOTS)

    # -- verifier ------------------------------------------------------------------
    _ANSWER = re.compile(r"(?:answer\s*[:=]?\s*)?(-?[\d,]+)\s*\.?\s*$", re.I)

    @classmethod
    def verify(cls, completion: str, answer: str) -> float:
        text = completion.strip()
        if "<calculator>" in text:  # a turn that still calls the tool is not an answer
            return 0.0
        m = cls._ANSWER.search(text)
        return 1.0 if m and m.group(1).replace(",", "") == str(answer) else 0.0
