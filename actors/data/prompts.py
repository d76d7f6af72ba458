"""Turning a dataset row into the exact text the policy sees, and checking it.

A row's prompt (``data.prompt_key``) is a string or a list of ``{role,
content}`` messages. ``PromptRenderer`` renders it -- with the policy
tokenizer's chat template (``system_prompt`` as a leading system message) or
as bare text -- and counts its tokens the way the rollout workers will
(``tokenizer(text)``). ``preprocess`` runs it over a whole file with
``Dataset.map`` (batched, cached as Arrow under the fleetrl cache), adding the
columns ``__text``, ``__tokens`` and, with ``data.answer_key``, ``__answer``.
"""

from __future__ import annotations

import hashlib
import json

from actors.data.config import DataConfig
from actors.validation import ConfigError

ROLES = ("system", "user", "assistant", "tool")
INTERNAL = ("__text", "__tokens", "__answer")
"""Columns ``preprocess`` adds; never passed to reward functions as metadata."""
VERSION = 1  # of the preprocessing: part of the cache fingerprint


def get_path(value, dotted: str):
    """``value["a"]["b"]`` for ``"a.b"`` (a field of a struct column)."""
    for part in dotted.split(".") if dotted else ():
        value = value[part]
    return value


def column(rows: dict, dotted: str, key: str, where: list[str]) -> list:
    """The values of column ``dotted`` in a ``Dataset.map`` batch (``"a.b"``: field b of struct column a);
    a missing value (null) is a ConfigError naming ``key`` and the row (``where[i]``)."""
    head, _, rest = dotted.partition(".")
    out = []
    for v, w in zip(rows[head], where):
        try:
            v = get_path(v, rest)
        except (KeyError, TypeError):
            v = None
        if v is None:
            raise ConfigError(f"{key}: {w}: {dotted!r} is null")
        out.append(v)
    return out


def check_columns(ds, cfg: DataConfig, path: str) -> None:
    """ConfigError naming the key and listing the file's columns if a configured column is missing."""
    for key in ("prompt_key", "answer_key"):
        dotted = getattr(cfg, key)
        if not dotted:
            continue
        feature = ds.features
        try:
            for part in dotted.split("."):
                feature = feature[part]
        except (KeyError, TypeError):
            raise ConfigError(f"data.{key}: {dotted!r} is not a column of {path} (columns: "
                              f"{', '.join(ds.column_names)})") from None


class PromptRenderer:
    """Renders prompts for one policy tokenizer and counts their tokens."""

    def __init__(self, tokenizer, cfg: DataConfig):
        self.tokenizer, self.cfg = tokenizer, cfg
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if cfg.chat_template and not has_template:
            raise ConfigError("data.chat_template: true, but the policy's tokenizer has no chat template")
        self.chat = has_template if cfg.chat_template is None else cfg.chat_template

    def fingerprint(self, parts: list) -> str:
        """A cache key of the rendering: the inputs, this config and the tokenizer's template and vocabulary."""
        tok = self.tokenizer
        blob = json.dumps([VERSION, parts, self.chat, self.cfg.prompt_key, self.cfg.answer_key,
                           self.cfg.system_prompt, getattr(tok, "name_or_path", ""),
                           getattr(tok, "chat_template", None) if self.chat else None, len(tok)], default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def messages(self, prompt, where: str) -> list[dict]:
        """The chat messages of one prompt value (a string or a message list), validated."""
        system = [{"role": "system", "content": self.cfg.system_prompt}] if self.cfg.system_prompt else []
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ConfigError(f"data.prompt_key: {where}: the prompt is empty")
            return system + [{"role": "user", "content": prompt}]
        if not isinstance(prompt, list) or not prompt:
            raise ConfigError(f"data.prompt_key: {where}: the prompt is {type(prompt).__name__}, not a string "
                              f"or a non-empty list of {{role, content}} messages")
        for i, m in enumerate(prompt):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
                raise ConfigError(f"data.prompt_key: {where}: message {i} is not a {{role, content}} mapping with "
                                  f"string content: {str(m)[:100]}")
            if m["role"] not in ROLES:
                raise ConfigError(f"data.prompt_key: {where}: message {i} has unknown role {m['role']!r} "
                                  f"(known: {', '.join(ROLES)})")
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
        return messages if messages[0]["role"] == "system" else system + messages

    def render(self, prompt, where: str) -> str:
        if self.chat:
            return self.tokenizer.apply_chat_template(self.messages(prompt, where), add_generation_prompt=True,
                                                      tokenize=False)
        if not isinstance(prompt, str):
            self.messages(prompt, where)  # a malformed list gets its own message first
            raise ConfigError(f"data.prompt_key: {where}: a message-list prompt needs a chat template "
                              f"(data.chat_template is false or the policy's tokenizer has none)")
        self.messages(prompt, where)  # the same checks as a chat prompt (not empty)
        return f"{self.cfg.system_prompt}\n\n{prompt}" if self.cfg.system_prompt else prompt

    def batch(self, rows: dict, indices: list[int], path: str) -> dict:
        """``Dataset.map`` function: the rendered text, its token count and the answer of each row."""
        where = [f"{path} row {i}" for i in indices]
        texts = [self.render(p, w) for p, w in zip(column(rows, self.cfg.prompt_key, "data.prompt_key", where), where)]
        out = {"__text": texts, "__tokens": [len(x) for x in self.tokenizer(texts)["input_ids"]]}
        if self.cfg.answer_key:
            out["__answer"] = [str(a) for a in column(rows, self.cfg.answer_key, "data.answer_key", where)]
        return out


def preprocess(ds, renderer: PromptRenderer, path: str, parts: list):
    """``ds`` with ``__text``/``__tokens``/``__answer`` columns (cached: a second load of the same
    file with the same config and tokenizer reads the Arrow file written by the first)."""
    from actors.data.files import cache_dir

    check_columns(ds, renderer.cfg, path)
    fp = renderer.fingerprint(parts)
    return ds.map(renderer.batch, batched=True, batch_size=1000, with_indices=True, fn_kwargs={"path": path},
                  new_fingerprint=fp, cache_file_name=str(cache_dir() / f"prompts-{fp}.arrow"),
                  desc=f"rendering {path}")
