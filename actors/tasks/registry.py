"""Built-in tasks by name (``task.name``) and ``make_task``."""

from __future__ import annotations

from dataclasses import dataclass

from actors.tasks.arithmetic import Arithmetic
from actors.tasks.base import Task
from actors.tasks.chat import ChatTemplate, load_tokenizer
from actors.tasks.multiply import Multiply
from actors.tasks.reverse import ReverseDigits
from actors.validation import ConfigError

TASKS = {ReverseDigits.name: ReverseDigits, Arithmetic.name: Arithmetic, Multiply.name: Multiply}


def make_task(name: str, *, chat_template: bool | None = False, tokenizer_path: str | None = None,
              **kwargs) -> Task:
    """Build task ``name``; with ``chat_template`` True (None: when the tokenizer at
    ``tokenizer_path`` has one) its prompts are rendered with that chat template."""
    try:
        cls = TASKS[name]
    except KeyError:
        raise ConfigError(f"task.name: unknown task {name!r}; known: {sorted(TASKS)}") from None
    tokenizer = None
    if chat_template is None:  # automatic: when the policy's tokenizer has a template (loaded once)
        tokenizer = load_tokenizer(tokenizer_path) if tokenizer_path else None
        use_chat = bool(getattr(tokenizer, "chat_template", None))
    else:
        use_chat = chat_template
    if use_chat and not tokenizer_path:
        raise ConfigError("task.chat_template: rendering with a chat template needs the policy's tokenizer")
    return cls(**kwargs, chat=ChatTemplate(tokenizer_path, tokenizer) if use_chat else None)


@dataclass
class TaskPrompts:
    """A built-in task's prompt stream, built where it is used (the coordinator actor):
    ``make_task(name, **kwargs).prompt_stream(start)``."""

    name: str
    kwargs: dict

    def prompt_stream(self, start: int = 0):
        return make_task(self.name, **self.kwargs).prompt_stream(start)
