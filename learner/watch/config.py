"""The ``watch`` config section: where a run's metrics go, sample logging, the report plot."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from actors.validation import require

REPORTERS = ("jsonl", "tensorboard", "wandb")
"""The values ``watch.report_to`` accepts."""


@dataclass(kw_only=True)
class WatchConfig:
    report_to: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])
    """Where each step's metrics go, any of ``jsonl``, ``tensorboard``, ``wandb``.
    ``RUN_DIR/metrics.jsonl`` is written always, listed or not: resuming and ``fleetrl report``
    read it. ``tensorboard``: event files under ``RUN_DIR/tensorboard/`` (``tensorboard --logdir
    RUN_DIR``). ``wandb``: needs the ``wandb`` package; runs offline (files under ``RUN_DIR/wandb``)
    unless ``WANDB_MODE`` is set, e.g. ``WANDB_MODE=online``."""
    samples_every: int = 10
    """Every N steps, log a few of the step's prompts, completions and rewards to
    ``RUN_DIR/samples.jsonl`` and TensorBoard's text tab (0 = never)."""
    samples_per_write: int = 4
    """Samples logged each time (spread from the highest reward to the lowest)."""
    plot: bool = True
    """Draw ``RUN_DIR/report.png`` (reward, evaluation, staleness, throughput, time per phase) at the
    end of every run; ``fleetrl report RUN_DIR`` draws it any time."""

    def __post_init__(self):
        require(isinstance(self.report_to, (list, tuple)) and all(isinstance(r, str) for r in self.report_to),
                "watch.report_to", f"expected a list of names ({', '.join(REPORTERS)}), got {self.report_to!r}")
        for name in self.report_to:
            require(name in REPORTERS, "watch.report_to", f"unknown value {name!r} (known: {', '.join(REPORTERS)})")
        require(len(set(self.report_to)) == len(self.report_to), "watch.report_to",
                f"{self.report_to!r} names a value twice")
        if "wandb" in self.report_to:
            require(importlib.util.find_spec("wandb") is not None, "watch.report_to",
                    "'wandb' needs the wandb package, which is not installed (pip install wandb), "
                    "or leave wandb out of watch.report_to")
        require(isinstance(self.samples_every, int) and self.samples_every >= 0, "watch.samples_every",
                "must be an integer >= 0 (0 = never)")
        require(isinstance(self.samples_per_write, int) and self.samples_per_write >= 1, "watch.samples_per_write",
                "must be an integer >= 1")
        require(isinstance(self.plot, bool), "watch.plot", f"expected true/false, got {self.plot!r}")
