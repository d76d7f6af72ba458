"""Prompt datasets as the coordinator's prompt source, and their held-out rows.

``load_prompt_data`` reads ``data.train_files`` / ``data.eval_files`` (or
splits ``data.eval_fraction`` off), renders and measures every prompt
(``prompts.preprocess``), drops the ones too long for the context (counted,
reported) and returns a ``PromptData``: the train rows as a
``DatasetPrompts`` stream and the held-out rows as ``Prompt`` objects.

``DatasetPrompts`` maps a prompt uid to (epoch, position): uid ``u`` is
position ``u % n`` of epoch ``u // n`` in that epoch's seeded permutation of
the ``n`` train rows. The coordinator's resume point (first uid not trained,
and the trained uids after it) therefore restores the epoch and position
exactly, and within an epoch every row is handed out once. Rows stay in the
memory-mapped Arrow table; pickling a ``DatasetPrompts`` (to the coordinator
actor) carries file paths, not rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from actors.data.config import DataConfig
from actors.data.files import cache_dir, file_fingerprint, load_file
from actors.data.prompts import INTERNAL, PromptRenderer, preprocess
from actors.types import Prompt
from actors.validation import ConfigError


class DatasetPrompts:
    """The train rows as a finite (``epochs``) or endless (``epochs=0``) prompt stream."""

    def __init__(self, ds, *, epochs: int = 0, shuffle: bool = True, seed: int = 0, prompt_column: str = "prompt",
                 fingerprint: str = ""):
        if len(ds) == 0:
            raise ValueError("DatasetPrompts needs at least one row")
        self.ds, self.size, self.epochs, self.shuffle, self.seed = ds, len(ds), epochs, shuffle, seed
        self.prompt_column = prompt_column.partition(".")[0]
        self.fingerprint = fingerprint
        self._order: tuple[int, np.ndarray] | None = None

    @property
    def total(self) -> int | None:
        """Prompts in the whole stream (None: endless)."""
        return self.epochs * self.size if self.epochs else None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_order": None}  # the permutation is recomputed, not shipped

    def order(self, epoch: int) -> np.ndarray:
        """Row indices in the order epoch ``epoch`` hands them out (a seeded permutation per epoch)."""
        if self._order is None or self._order[0] != epoch:
            rows = (np.random.default_rng([self.seed, epoch]).permutation(self.size) if self.shuffle
                    else np.arange(self.size))
            self._order = (epoch, rows)
        return self._order[1]

    def position(self, uid: int) -> tuple[int, int]:
        """(epoch, position in the epoch) of prompt ``uid``."""
        return divmod(uid, self.size)

    def row_of(self, uid: int) -> int:
        epoch, pos = self.position(uid)
        return int(self.order(epoch)[pos])

    def prompt(self, uid: int) -> Prompt:
        return row_prompt(self.ds[self.row_of(uid)], uid, self.prompt_column)

    def prompt_stream(self, start: int = 0) -> Iterator[Prompt]:
        """Prompts ``start``, ``start + 1``, ... to the end of the last epoch."""
        uid = start
        while self.total is None or uid < self.total:
            yield self.prompt(uid)
            uid += 1

    def progress(self, cursor: int) -> dict:
        """Where the stream stands when ``cursor`` is the first prompt not trained on."""
        epoch, pos = self.position(cursor)
        return {"epoch": epoch, "position": pos, "size": self.size, "epochs": self.epochs}


def row_prompt(row: dict, uid: int, prompt_column: str) -> Prompt:
    """A preprocessed row as a ``Prompt``: its rendered text, and every other column as metadata
    (``__answer`` as ``answer``)."""
    metadata = {k: v for k, v in row.items() if k not in INTERNAL and k != prompt_column}
    if "__answer" in row:
        metadata["answer"] = row["__answer"]
    return Prompt(uid=uid, text=row["__text"], metadata=metadata)


@dataclass
class PromptData:
    train: DatasetPrompts
    eval: list[Prompt]
    info: dict = field(default_factory=dict)
    """What loading found: rows per split, prompts dropped as too long, train/eval duplicates."""


def _load_split(paths: list[str], key: str, renderer: PromptRenderer):
    import datasets

    parts = []
    for path in paths:
        ds = load_file(path, key)
        if len(ds) == 0:
            raise ConfigError(f"{key}: {path}: the dataset has no rows")
        parts.append(preprocess(ds, renderer, path, file_fingerprint(path)))
    try:
        return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    except ValueError as e:
        raise ConfigError(f"{key}: the files do not have the same columns ({' '.join(str(e).split())[:200]})") from None


def _drop_too_long(ds, limit: int, key: str):
    """(rows of ``ds`` of at most ``limit`` prompt tokens, how many were longer)."""
    tokens = ds.with_format("arrow")["__tokens"].to_numpy()  # one Arrow column, not a row at a time
    keep = np.flatnonzero(tokens <= limit)
    if len(keep) == 0:
        raise ConfigError(f"{key}: all {len(ds)} prompts are longer than {limit} tokens (the policy's context minus "
                          f"rollout.max_new_tokens, or data.max_prompt_tokens); the longest has {int(tokens.max())}")
    return (ds if len(keep) == len(ds) else _select(ds, keep, f"keep-{limit}")), len(ds) - len(keep)


def _select(ds, rows: np.ndarray, tag: str):
    """``ds.select(rows)`` with the index mapping in a cached Arrow file: it pickles as a path."""
    name = cache_dir() / f"indices-{ds._fingerprint}-{tag}.arrow"
    return ds.select(rows, indices_cache_file_name=str(name))


def _split(ds, fraction: float, seed: int):
    """A seeded, disjoint (train, eval) split of ``ds``'s rows."""
    order = np.random.default_rng([seed, 1 << 20]).permutation(len(ds))
    k = max(1, int(round(len(ds) * fraction)))
    if k >= len(ds):
        raise ConfigError(f"data.eval_fraction: {fraction} of {len(ds)} rows leaves no train rows")
    return (_select(ds, np.sort(order[k:]), f"train-{fraction}-{seed}"),
            _select(ds, np.sort(order[:k]), f"eval-{fraction}-{seed}"))


def duplicates(train, held_out) -> int:
    """Train rows whose rendered prompt is also a held-out prompt (Arrow compute, no Python rows)."""
    import pyarrow.compute as pc

    texts = train.with_format("arrow")["__text"]
    held = held_out.with_format("arrow")["__text"]
    return int(pc.sum(pc.is_in(texts, value_set=held.combine_chunks() if hasattr(held, "combine_chunks") else held)
                      ).as_py() or 0)


def load_prompt_data(cfg: DataConfig, tokenizer, *, max_prompt_tokens: int, say=print) -> PromptData:
    """Train and held-out prompts of ``cfg``, rendered for ``tokenizer``; prompts longer than
    ``max_prompt_tokens`` dropped (counted). ConfigError (naming key, file, row) on bad input."""
    renderer = PromptRenderer(tokenizer, cfg)
    train = _load_split(cfg.train_files, "data.train_files", renderer)
    train, too_long = _drop_too_long(train, max_prompt_tokens, "data.train_files")
    info = {"train_rows": len(train), "too_long": {"train": too_long}, "chat_template": renderer.chat}
    if cfg.eval_files:
        held = _load_split(cfg.eval_files, "data.eval_files", renderer)
        held, info["too_long"]["eval"] = _drop_too_long(held, max_prompt_tokens, "data.eval_files")
    elif cfg.eval_fraction:
        train, held = _split(train, cfg.eval_fraction, cfg.seed)
    else:
        held = None
    if held is not None:
        info["duplicates"] = dup = duplicates(train, held)
        if dup:
            say(f"warning: {dup} train rows have the same prompt as a held-out row (data.train_files / "
                f"data.eval_files overlap): held-out accuracy overstates generalisation")
        if cfg.eval_size:
            held = held.select(range(min(cfg.eval_size, len(held))), keep_in_memory=True)
    for split, n in info["too_long"].items():
        if n:
            say(f"data: {n} {split} prompts longer than {max_prompt_tokens} tokens were dropped")
    column = cfg.prompt_key.partition(".")[0]
    eval_prompts = [row_prompt(row, i, column) for i, row in enumerate(held)] if held is not None else []
    info["train_rows"], info["eval_rows"] = len(train), len(eval_prompts)
    fp = renderer.fingerprint([file_fingerprint(p) for p in cfg.train_files] + [cfg.eval_fraction, cfg.seed, too_long])
    return PromptData(DatasetPrompts(train, epochs=cfg.epochs, shuffle=cfg.shuffle, seed=cfg.seed, prompt_column=column,
                                     fingerprint=fp), eval_prompts, info)
