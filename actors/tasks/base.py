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
import zlib
from dataclasses import dataclass
from typing import Iterator

from actors.tasks.chat import ChatTemplate
from actors.types import Prompt


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str


class Task:
    """A seeded problem space split by hash into a training part and a held-out part.

    Subclasses draw one problem at a time (``_problem``: hash key, bare prompt,
    chat instruction, answer). ``reward`` names the built-in reward function
    (``reward.functions``) that verifies the task's answers, and greedy
    evaluation scores with the same function.
    """

    name = ""
    reward = "exact_match"
    env = ""
    """The environment its episodes need (``env.name`` when the run sets none); empty = one turn."""

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
                return Example(prompt=self._render(instruction) if self.chat else bare, answer=answer)

    def _render(self, instruction: str) -> str:
        """The chat prompt of one problem (a task may add a system message)."""
        return self.chat.render(instruction)

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
