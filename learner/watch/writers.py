"""Send a run's metrics rows and evaluations to TensorBoard and, when configured, Weights & Biases.

``MetricWriters.scalars`` flattens a ``metrics.jsonl`` row into tagged scalars grouped
by prefix (``reward/``, ``loss/``, ``optim/``, ``policy/``, ``staleness/``, ``batch/``,
``throughput/``, ``time/``, ``counters/``, ``eval/``; anything unknown goes to ``other/``).
Nested dicts become path tags (``reward_by_name: {exact: 0.5}`` -> ``reward/by_name/exact``);
``None``, strings and lists are left out. TensorBoard event files go under
``RUN_DIR/tensorboard/``; a resumed run writes a purge marker at the step after its
checkpoint, so TensorBoard hides what the earlier run logged after it (a fresh run in the
same directory hides everything before it).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from learner.watch.config import WatchConfig

FLUSH_EVERY_S = 2.0
"""TensorBoard event files are flushed at most this often (and at close): a flush per step costs."""

TAGS = {
    "reward_mean": "reward/mean", "reward_std": "reward/std", "adv_abs_mean": "reward/adv_abs_mean",
    "zero_adv_group_frac": "reward/zero_adv_group_frac",
    "loss": "loss/total", "grad_norm": "optim/grad_norm", "lr": "optim/lr", "skipped_step": "optim/skipped_step",
    "kl": "policy/kl", "entropy": "policy/entropy", "clip_frac": "policy/clip_frac", "ratio_mean": "policy/ratio_mean",
    "ratio_max": "policy/ratio_max", "approx_kl": "policy/approx_kl",
    "is_weight_mean": "off_policy/is_weight_mean", "is_weight_ess": "off_policy/is_weight_ess",
    "is_weight_small": "off_policy/is_weight_small",
    "staleness_mean": "staleness/mean", "staleness_max": "staleness/max",
    "samples": "batch/samples", "active_samples": "batch/active_samples", "tokens": "batch/tokens",
    "sequence_tokens": "batch/sequence_tokens", "response_len_mean": "batch/response_len_mean",
    "filtered_groups": "batch/filtered_groups",
    "samples_per_s": "throughput/samples_per_s",
    "sample_s": "time/sample_s", "update_s": "time/update_s", "update_sync_s": "time/update_sync_s",
    "time_s": "time/elapsed_s",
    "policy_version": "counters/policy_version", "produced": "counters/produced", "trained": "counters/trained",
    "dropped": "counters/dropped", "buffered_groups": "counters/buffered_groups",
}
"""Tag of each known flat key of a metrics row."""
NESTED = {"reward_by_name": "reward/by_name", "dropped_by_reason": "counters/dropped_by_reason"}
"""Tag prefix of each known nested key (``reward_by_name.exact`` -> ``reward/by_name/exact``)."""
NOT_SCALARS = {"step", "t", "eval_accuracy"}
"""Row keys that are the x axis, not a metric, or are written elsewhere (``eval_accuracy``: the
evaluation's own row, ``MetricWriters.eval``, has it as ``eval/greedy_accuracy``)."""
EVAL_META = {"step", "time_s", "t", "policy_version"}
"""Keys of an evaluation row that say when it ran, not how it did."""


def _number(v) -> bool:
    return isinstance(v, (int, float))  # bools too (as 0/1)


def flatten(d: dict, prefix: str = "") -> dict[str, float]:
    """``{"a": {"b": 1, "c": None}, "d": [1], "e": 2.0}`` -> ``{"a/b": 1.0, "e": 2.0}``: numbers only."""
    out: dict[str, float] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "/"))
        elif _number(v):
            out[key] = float(v)
    return out


def scalar_tags(row: dict) -> dict[str, float]:
    """The TensorBoard tags and values of one metrics row."""
    out: dict[str, float] = {}
    for k, v in row.items():
        if k in NOT_SCALARS:
            continue
        if isinstance(v, dict):
            prefix = NESTED.get(k, f"other/{k}")
            out.update({f"{prefix}/{sub}": x for sub, x in flatten(v).items()})
        elif _number(v):
            out[TAGS.get(k, f"other/{k}")] = float(v)
    return out


def eval_tags(metrics: dict) -> dict[str, float]:
    """``{"greedy_accuracy": .5, "by_source": {"gsm8k": {"pass@1": .4}}}`` ->
    ``{"eval/greedy_accuracy": .5, "eval/gsm8k/pass@1": .4}``."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        if k in EVAL_META:
            continue
        if k == "by_source" and isinstance(v, dict):
            for source, m in v.items():
                if isinstance(m, dict):
                    out.update({f"eval/{source}/{name}": x for name, x in flatten(m).items()})
        elif isinstance(v, dict):
            out.update({f"eval/{k}/{name}": x for name, x in flatten(v).items()})
        elif _number(v):
            out[f"eval/{k}"] = float(v)
    return out


class MetricWriters:
    """The configured metric backends of one run (``metrics.jsonl`` itself is ``RunReport``'s)."""

    def __init__(self, run_dir: Path, cfg: WatchConfig, run_config: dict | None = None, *,
                 resume_step: int | None = None):
        """``run_config``: the resolved config as a dict (TensorBoard text ``config`` at step 0 of a
        fresh run, W&B's run config). ``resume_step``: the run resumes after this step."""
        self.run_dir = Path(run_dir)
        self.tb = self.wandb = None
        self.closed = False
        self._flushed = 0.0  # monotonic time of the last TensorBoard flush
        if "tensorboard" in cfg.report_to:
            from torch.utils.tensorboard import SummaryWriter

            # purge marker: a resumed run hides the earlier run's events from the step after its
            # checkpoint on; a fresh run in a used directory hides all of the earlier run's
            _after_existing_event_files(self.run_dir / "tensorboard")
            self.tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"),
                                    purge_step=0 if resume_step is None else resume_step + 1, flush_secs=30)
            if run_config is not None and resume_step is None:
                self.text(0, "config", _code_block(json.dumps(run_config, indent=2, default=str)))
        if "wandb" in cfg.report_to:
            self.wandb = _start_wandb(self.run_dir, run_config, resumed=resume_step is not None)

    def scalars(self, step: int, row: dict, wall_time: float | None = None) -> dict[str, float]:
        """One metrics row at ``step`` (``wall_time``: unix time, default now); returns the tags written."""
        return self._write(step, scalar_tags(row), wall_time)

    def eval(self, step: int, metrics: dict, wall_time: float | None = None) -> dict[str, float]:
        """One evaluation at ``step`` under ``eval/`` (per data source ``eval/<source>/<metric>``)."""
        return self._write(step, eval_tags(metrics), wall_time)

    def text(self, step: int, tag: str, markdown: str) -> None:
        """A Markdown text (TensorBoard's text tab) at ``step``."""
        if self.tb is not None:
            self.tb.add_text(tag, markdown, global_step=step)
            self._flush_tb()

    def _write(self, step: int, tags: dict[str, float], wall_time: float | None) -> dict[str, float]:
        wall_time = time.time() if wall_time is None else wall_time
        if self.tb is not None:
            for tag, value in tags.items():
                self.tb.add_scalar(tag, value, global_step=step, walltime=wall_time)
            self._flush_tb()
        if self.wandb is not None and tags and not self.closed:
            self.wandb.log({k: v for k, v in tags.items() if math.isfinite(v)}, step=step)
        return tags

    def _flush_tb(self) -> None:
        """A watched run shows each write within ``FLUSH_EVERY_S``. After ``close`` a write (the final evaluation)
        goes to an event file of its own, closed again at once."""
        if self.closed:
            self.tb.close()
        elif time.monotonic() - self._flushed >= FLUSH_EVERY_S:
            self.tb.flush()
            self._flushed = time.monotonic()

    def close(self) -> None:
        """Flush and close every backend (a second call does nothing). TensorBoard still takes
        a later write (in a new event file); W&B does not (its run is finished)."""
        if self.closed:
            return
        self.closed = True
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _code_block(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


def _after_existing_event_files(log_dir: Path) -> None:
    """TensorBoard reads event files in name order, and a name is ``events.out.tfevents.<unix second>.
    <host>.<pid>.<counter>``: within one second a counter of 10 sorts before 9, and the purge marker of
    a new writer must come after the files it purges. So a new writer waits (at most a second) until
    the clock is past the newest existing file's second."""
    newest = -1
    for f in log_dir.glob("events.out.tfevents.*"):
        try:
            newest = max(newest, int(f.name.split(".")[3]))
        except (IndexError, ValueError):
            continue
    while time.time() < newest + 1:
        time.sleep(0.05)


def _start_wandb(run_dir: Path, run_config: dict | None, *, resumed: bool):
    """A W&B run for ``run_dir``: offline unless $WANDB_MODE says otherwise; a resumed run continues
    the same W&B run (its id is kept in ``RUN_DIR/wandb/run_id``)."""
    import wandb

    (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
    id_file = run_dir / "wandb" / "run_id"
    run_id = id_file.read_text().strip() if resumed and id_file.is_file() else None
    if not run_id:
        run_id = wandb.util.generate_id()
        id_file.write_text(run_id + "\n")
    kwargs = {} if os.environ.get("WANDB_MODE") else {"mode": "offline"}
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "fleetrl"), name=run_dir.resolve().name, id=run_id,
                      resume="allow", dir=str(run_dir), config=run_config or {}, **kwargs)
