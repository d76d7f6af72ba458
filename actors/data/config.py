"""``DataConfig``: the ``data`` section (user prompt datasets)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from actors.validation import require


@dataclass(kw_only=True)
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """Prompt datasets to train on: JSONL/JSON, Parquet, CSV or Arrow files, or folders written by
    ``datasets.Dataset.save_to_disk``, loaded with Hugging Face ``datasets`` (memory-mapped). Empty = the
    built-in task (``task`` section) supplies the prompts."""
    eval_files: list[str] = field(default_factory=list)
    """Held-out prompts for evaluation, in the same formats; empty = split ``eval_fraction`` off the train files."""
    eval_fraction: float = 0.0
    """Without eval_files: this fraction of the train rows is held out for evaluation (deterministic by
    ``seed``, disjoint from training)."""
    eval_size: int = 0
    """Evaluate on at most this many held-out rows (the first ones); 0 = all."""
    prompt_key: str = "prompt"
    """Column with the prompt: a string, or a list of ``{role, content}`` messages (rendered with the policy's
    chat template). A dotted key reads a field of a struct column."""
    answer_key: str = ""
    """Column with the reference answer, passed to the reward functions as ``answer`` (a dotted key reads a
    struct field, e.g. verl's ``reward_model.ground_truth``); empty = none. Every other column reaches the
    reward functions as metadata under its own name, as in TRL."""
    source_key: str = "data_source"
    """Column naming each row's source (verl's ``data_source``): evaluation reports metrics per source when
    the column exists."""
    system_prompt: str = ""
    """A system message put before every prompt (before a bare prompt as a paragraph when no chat template)."""
    chat_template: Optional[bool] = None
    """Render prompts with the policy tokenizer's chat template (true), as bare text (false), or whenever
    the tokenizer has one (null). Message-list prompts need it."""
    epochs: int = 0
    """Passes over the train rows; the run ends after them or after ``train.steps``, whichever comes first
    (0 = as many as ``train.steps`` needs)."""
    shuffle: bool = True
    """Shuffle the train rows in every epoch (a different seeded order per epoch)."""
    seed: int = 0
    """Seed of the per-epoch shuffle and of the ``eval_fraction`` split."""
    max_prompt_tokens: int = 0
    """Drop prompts longer than this many tokens at load (counted and reported); 0 = the policy's context
    length minus ``rollout.max_new_tokens``."""

    def __post_init__(self):
        require(0 <= self.eval_fraction < 1, "data.eval_fraction", "must be in [0, 1)")
        require(not (self.eval_files and self.eval_fraction), "data.eval_fraction",
                "set either data.eval_files or data.eval_fraction, not both")
        require(self.eval_size >= 0, "data.eval_size", "must be >= 0 (0 = all)")
        require(self.epochs >= 0, "data.epochs", "must be >= 0 (0 = until train.steps)")
        require(self.max_prompt_tokens >= 0, "data.max_prompt_tokens", "must be >= 0 (0 = the context)")
        require(bool(self.prompt_key), "data.prompt_key", "must name a column")
        require(bool(self.train_files) or not (self.eval_files or self.eval_fraction), "data.train_files",
                "eval_files/eval_fraction need train_files")

    @property
    def enabled(self) -> bool:
        return bool(self.train_files)
