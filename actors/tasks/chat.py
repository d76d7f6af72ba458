"""Rendering a task's instruction with the policy tokenizer's chat template."""

from __future__ import annotations

from actors.validation import ConfigError


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
            raise ConfigError(f"task.chat_template: the tokenizer of {tokenizer_path!r} has no chat template")
        probe = [{"role": "user", "content": "What is 1 + 1?"}]
        text = self.render(probe[0]["content"])
        ids = self.tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"]
        if self.tokenizer(text)["input_ids"] != ids:
            raise ConfigError(f"task.chat_template: the tokenizer of {tokenizer_path!r} does not tokenize its own "
                             f"rendered chat prompt to the template's ids (it adds special tokens?)")

    def render(self, user_message: str, system: str | None = None, shots: list[dict] = ()) -> str:
        """The prompt of ``user_message`` after an optional system message and example turns
        (``shots``: messages of a solved example, e.g. a tool call and its result)."""
        messages = ([{"role": "system", "content": system}] if system else []) + list(shots) + \
            [{"role": "user", "content": user_message}]
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)
