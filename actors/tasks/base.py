"""Built-in verifiable tasks: prompt streams, labelled sets and verifiers.

A task is deterministic given its seed: the RL prompt stream, the small fixed
labelled set used for the supervised warm start and the held-out evaluation
set are drawn from disjoint parts of the problem space (a crc32 hash of each
problem picks the held-out eighth), so held-out accuracy measures
generalisation, not memorisation.

A task writes each problem either as a bare completion prompt (``"1234="``),
or -- for a policy whose tokenizer has a chat template, e.g. SmolLM2-Instruct --
as an instruction in a user message rendered with that template
(``ChatTemplate``); ``Prompt.text`` is always exactly the text the policy sees.
"""

from __future__ import annotations

import random
import re
import zlib
from dataclasses import dataclass
from typing import Iterator

from actors.types import Prompt


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


class ChatTemplate:
    """Renders a user message with a tokenizer's chat template (generation prompt added).

    The rollout workers tokenize ``Prompt.text`` with the plain tokenizer call, so
    the rendered text must tokenize to exactly the ids ``apply_chat_template``
    gives (no second BOS, say); that is checked once, on a probe message.
    """

    def __init__(self, tokenizer_path: str, tokenizer=None):
        """``tokenizer``: the one at ``tokenizer_path`` if the caller already loaded it."""
        self.tokenizer_path = tokenizer_path
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(tokenizer_path)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"task.chat_template: the tokenizer of {tokenizer_path!r} has no chat template")
        probe = [{"role": "user", "content": "What is 1 + 1?"}]
        text = self.render(probe[0]["content"])
        ids = self.tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]
        if self.tokenizer(text)["input_ids"] != ids:
            raise ValueError(f"task.chat_template: the tokenizer of {tokenizer_path!r} does not tokenize its own "
                             f"rendered chat prompt to the template's ids (it adds special tokens?)")

    def render(self, user_message: str) -> str:
        return self.tokenizer.apply_chat_template([{"role": "user", "content": user_message}],
                                                  add_generation_prompt=True, tokenize=False)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


class Task:
    """A seeded problem space split by hash into a training part and a held-out part.

    Subclasses draw one problem at a time (``_problem``: hash key, bare prompt,
    chat instruction, answer). ``reward`` names the built-in reward function
    (``reward.functions``) that verifies the task's answers, and greedy
    evaluation scores with the same function.
    """

    name = ""
    reward = "exact_match"

    def __init__(self, seed: int = 0, chat: ChatTemplate | None = None):
        self.seed = seed
        self.chat = chat

    @property
    def max_new_tokens(self) -> int:
        """Default completion length cap (``rollout.max_new_tokens: 0``)."""
        raise NotImplementedError

    def _problem(self, rng: random.Random) -> tuple[str, str, str, str]:
        raise NotImplementedError

    def _is_heldout(self, key: str) -> bool:
        return zlib.crc32(f"{self.seed}:{key}".encode()) % 8 == 0

    def _draw(self, rng: random.Random, heldout: bool) -> Example:
        while True:
            key, bare, instruction, answer = self._problem(rng)
            if self._is_heldout(key) == heldout:
                return Example(prompt=self.chat.render(instruction) if self.chat else bare, answer=answer)

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


class ReverseDigits(Task):
    """Reverse a string of ``num_digits`` digits: ``"1234="`` -> ``"4321"``.

    Reward is 1.0 for an exact answer (whitespace-trimmed), 0.0 otherwise.
    The held-out set is every string whose hash bucket is 0 (1/8 of the space);
    the labelled set and the RL prompt stream never contain those strings.
    """

    name = "reverse"
    alphabet = "0123456789="

    def __init__(self, num_digits: int = 4, seed: int = 0, chat: ChatTemplate | None = None):
        if num_digits < 1:
            raise ValueError("task.num_digits must be >= 1")
        super().__init__(seed, chat)
        self.num_digits = num_digits

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
        """Raise ValueError naming the config key if the task parameters are invalid."""
        if len(operand_digits) != 2 or not all(1 <= d <= 9 for d in operand_digits):
            raise ValueError(f"task.operand_digits: two digit counts in 1..9, got {list(operand_digits)}")
        if not operations or any(op not in cls.OPERATIONS for op in operations) \
                or len(set(operations)) != len(operations):
            raise ValueError(f"task.operations: a non-empty list of distinct {list(cls.OPERATIONS)}, "
                             f"got {list(operations)}")

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


TASKS = {ReverseDigits.name: ReverseDigits, Arithmetic.name: Arithmetic}


def make_task(name: str, *, chat_template: bool | None = False, tokenizer_path: str | None = None,
              **kwargs) -> Task:
    """Build task ``name``; with ``chat_template`` True (None: when the tokenizer at
    ``tokenizer_path`` has one) its prompts are rendered with that chat template."""
    try:
        cls = TASKS[name]
    except KeyError:
        raise ValueError(f"task.name: unknown task {name!r}; known: {sorted(TASKS)}") from None
    tokenizer = None
    if chat_template is None:  # automatic: when the policy's tokenizer has a template (loaded once)
        tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
        use_chat = bool(getattr(tokenizer, "chat_template", None))
    else:
        use_chat = chat_template
    if use_chat and not tokenizer_path:
        raise ValueError("task.chat_template: rendering with a chat template needs the policy's tokenizer")
    return cls(**kwargs, chat=ChatTemplate(tokenizer_path, tokenizer) if use_chat else None)


def exact_match_reward(prompts: list[str], completions: list[str], *, answer: list[str], **_) -> list[float]:
    """Verifier reward for built-in tasks: 1.0 if the completion equals ``answer``."""
    return [ReverseDigits.verify(c, a) for c, a in zip(completions, answer)]


def arithmetic_reward(prompts: list[str], completions: list[str], *, answer: list[str], **_) -> list[float]:
    """Verifier reward of the arithmetic task: 1.0 if the reply has the answer format
    (``"85"`` or ``"82 + 3 = 85"``, see ``Arithmetic``) and its number is ``answer``."""
    return [Arithmetic.verify(c, a) for c, a in zip(completions, answer)]
