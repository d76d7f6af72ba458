"""What a run reports: a metrics row per step, the progress bar, the summary, peak memory.

``RunReport`` appends one JSON row per step to ``metrics.jsonl`` (the
learner's metrics plus timing and the coordinator's counters) and keeps the
history the summary is computed from; it also sends each row to TensorBoard /
W&B (``watch.report_to``), appends held-out evaluations to ``eval.jsonl``, a few
samples to ``samples.jsonl`` and draws ``report.png`` at the end (``learner/watch``).
A resumed run first cuts the files back to the checkpoint's step, so no step
appears twice. ``run_summary`` is what
``summary.json`` holds, for a finished, stopped or failed run; after restarts
its counters add up every segment's.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import ray

from actors.runtime.placement import peak_rss_mib
from learner.watch.config import WatchConfig
from learner.watch.jsonl import append, open_cut_back
from learner.watch.plot import draw_report
from learner.watch.samples import SampleLog
from learner.watch.writers import MetricWriters

COUNTERS = ("produced", "trained", "dropped", "buffered_groups")


class RunReport:
    def __init__(self, run_dir: Path, *, total_steps: int, progress: bool, out, log_every: int,
                 resume_step: int | None = None, watch: WatchConfig | None = None, run_config: dict | None = None):
        """``resume_step``: the run resumes after this step; rows after it are removed (they
        will be written again) and the rows up to it are the start of the history.
        ``watch``: where else the rows go (None = ``WatchConfig()``); ``run_config``: the
        resolved config as a dict, for TensorBoard's text tab and W&B."""
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.watch = watch if watch is not None else WatchConfig()
        self.file, self.history, later = open_cut_back(self.path, resume_step)
        # samples of the steps after the checkpoint, trained before and trained again now
        self.rolled_back = sum(r.get("samples", 0) for r in later)
        self.eval_path = self.run_dir / "eval.jsonl"
        self.eval_file, self.evals, _ = open_cut_back(self.eval_path, resume_step)
        self.writers = MetricWriters(self.run_dir, self.watch, run_config, resume_step=resume_step)
        self.sample_log = SampleLog(self.run_dir, self.watch.samples_every, self.watch.samples_per_write,
                                    resume_step=resume_step)
        self.bar = _progress(total_steps, progress, out)
        self.bar.update(len(self.history))
        self.progress, self.out, self.log_every = progress, out, log_every
        self.trained = 0
        self.closed = False

    def step(self, step: int, version: int, metrics: dict, counters: dict, *, elapsed_s: float, sample_s: float,
             update_sync_s: float) -> dict:
        """Record step ``step``: one metrics row, the progress bar, a log line every ``log_every``."""
        self.trained += metrics["samples"]
        row = {"step": step, "policy_version": version, "time_s": round(elapsed_s, 3), "t": round(time.time(), 3),
               "sample_s": sample_s,
               "update_sync_s": update_sync_s, "samples_per_s": self.trained / elapsed_s, **metrics,
               **{k: counters[k] for k in COUNTERS}}
        append(self.file, row)
        self.history.append(row)
        self.writers.scalars(step, row, wall_time=row["t"])
        self.bar.update(1)
        self.bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", v=version, sps=f"{row['samples_per_s']:.0f}",
                             refresh=False)  # the bar itself redraws at most every mininterval
        if not self.progress and self.log_every and step % self.log_every == 0:
            print(f"step {step} reward {metrics['reward_mean']:.3f} samples/s {row['samples_per_s']:.0f}",
                  file=self.out, flush=True)
        return row

    def eval(self, step: int, metrics: dict, time_s: float, policy_version: int) -> dict:
        """Record a held-out evaluation of the weights after step ``step`` (0 = before RL): one
        ``eval.jsonl`` row ``{"step", "time_s", "t", "policy_version", **metrics}`` and ``eval/`` scalars."""
        row = {"step": step, "time_s": round(time_s, 3), "t": round(time.time(), 3), "policy_version": policy_version,
               **{k: v for k, v in metrics.items() if k not in ("step", "time_s", "t", "policy_version")}}
        if self.closed:  # e.g. the final evaluation, after the steps' close(): the files, then the plot again
            with self.eval_path.open("a") as f:
                append(f, row)
        else:
            append(self.eval_file, row)
        self.evals.append(row)
        self.writers.eval(step, metrics, wall_time=row["t"])
        return row

    def samples_due(self, step: int) -> bool:
        """Whether step ``step`` logs samples (``watch.samples_every``)."""
        return self.sample_log.due(step)

    def samples(self, step: int, rows: list[dict]) -> list[dict]:
        """At a due step, log a few of ``rows`` (prompt, completion, reward, rewards, policy_version)
        to ``samples.jsonl`` and TensorBoard; returns the rows written ([] when not due)."""
        return self.sample_log.write(step, rows, self.writers)

    def close(self, draw: bool = True) -> None:
        """Close the files and writers, then draw ``report.png`` (``watch.plot`` and ``draw``); a second
        call does nothing. An ``eval`` after it still goes to eval.jsonl and TensorBoard (not W&B)."""
        if self.closed:
            return
        self.closed = True
        self.bar.close()
        self.file.close()
        self.eval_file.close()
        self.sample_log.close()
        self.writers.close()
        if self.watch.plot and draw:
            self.draw()

    def draw(self) -> Path | None:
        """Draw ``report.png`` from the run's files (again, e.g. once summary.json is written); a
        failure is one line to ``out``, never the run's."""
        try:
            return draw_report(self.run_dir)
        except Exception as e:  # noqa: BLE001 - a plot must not fail a run
            print(f"report.png not drawn: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                  file=self.out, flush=True)
            return None

    def reward_first_last(self) -> tuple[float, float]:
        """Mean training reward of the first and the last tenth of the steps."""
        rewards = [r["reward_mean"] for r in self.history]
        k = max(1, len(rewards) // 10)
        if not rewards:
            return math.nan, math.nan
        return sum(rewards[:k]) / k, sum(rewards[-k:]) / k


COUNTED = ("produced", "trained", "dropped")


def lost_coordinator_stats(counters: dict) -> dict:
    """The counters of the last publish when the coordinator died: what was buffered or
    handed out then is dropped as ``coordinator_lost`` (later samples were never counted)."""
    c = {"produced": 0, "trained": 0, "dropped": 0, "dropped_by_reason": {}, "policy_version": 0, **counters}
    lost = c["produced"] - c["trained"] - c["dropped"]
    c["dropped_by_reason"] = {**c["dropped_by_reason"], "coordinator_lost": lost}
    c["dropped"] += lost
    return c


def run_summary(trainer, status: str, reason: str, stats: dict | None, *, rl_s: float, wall_s: float,
                eval_after: float | None, extra: dict) -> dict:
    """What ``summary.json`` holds; counters are totals over the run's segments."""
    stats = stats or lost_coordinator_stats({})
    segment = {"status": status, "reason": reason, "steps": trainer.step, "rl_s": round(rl_s, 2),
               **{k: stats[k] for k in COUNTED}, "dropped_by_reason": dict(stats["dropped_by_reason"]),
               "events": list(trainer.supervisor.events) if trainer.supervisor else [],
               "rollout_replacements": trainer.rollouts.replacements if hasattr(trainer, "rollouts") else 0,
               "reward_replacements": trainer.supervisor.reward_replacements if trainer.supervisor else 0}
    # a restarted segment redoes the steps after its checkpoint: what the earlier segment trained
    # of them counts as rolled back (each segment's own counters stay as they were)
    segment["rolled_back"] = trainer.report.rolled_back if trainer.report is not None and trainer.segments else 0
    segments = [*trainer.segments, segment]
    by_reason: dict = {}
    for s in segments:
        for k, v in s["dropped_by_reason"].items():
            by_reason[k] = by_reason.get(k, 0) + v
    rolled_back = sum(s.get("rolled_back", 0) for s in segments)
    if rolled_back:
        by_reason["rolled_back"] = rolled_back
    totals = {k: sum(s[k] for s in segments) for k in COUNTED}
    totals["trained"] -= rolled_back
    totals["dropped"] += rolled_back
    first, last = trainer.report.reward_first_last() if trainer.report is not None else (math.nan, math.nan)
    return {
        "status": status, "reason": reason, "eval_before": trainer.eval_before, "eval_after": eval_after,
        "steps": trainer.step, "wall_s": round(wall_s, 2), "rl_s": round(rl_s, 2), "setup_s": round(trainer.setup_s, 2),
        "samples_per_s": round(stats["trained"] / rl_s, 2) if rl_s > 0 else 0.0,
        **totals, "dropped_by_reason": by_reason,
        "final_policy_version": stats["policy_version"], "reward_first": first, "reward_last": last,
        "max_staleness": trainer.cfg.train.max_staleness, "run_dir": str(trainer.run_dir.resolve()),
        **{k: sum(s[k] for s in segments) for k in ("rollout_replacements", "reward_replacements")},
        "restarts": len(trainer.segments), "segments": segments, "events": [e for s in segments for e in s["events"]],
        "weight_sync": trainer.cfg.train.weight_sync, "learner_dtype": getattr(trainer, "learner_dtype", None),
        "rollout_dtype": getattr(trainer, "rollout_dtype", None),
        **(trainer.weights.summary() if trainer.weights is not None else {}),
        "reclaimed_prompts": stats.get("reclaimed_prompts", 0), **extra,
    }


def peak_memory(learner, rollout_actors: list, reward_actors: list, timeout_s: float = 30.0) -> dict:
    """Peak resident memory (MiB) of the learner, the largest rollout worker and reward
    worker, and the driver (Ray's own processes are not included). Best effort: an
    actor that died or does not answer is left out (None when none of a kind answers);
    a finished run never fails here."""
    def answers(actors: list) -> list[dict]:
        refs = [a.where.remote() for a in actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        out = []
        for r in ready:
            try:
                out.append(ray.get(r))
            except ray.exceptions.RayError:
                pass
        return out

    def peaks(actors: list) -> list[float]:
        return [w["peak_rss_mib"] for w in answers(actors)]

    (learner_where,) = answers([learner]) or [None]
    return {"learner": learner_where["peak_rss_mib"] if learner_where else None,
            "rollout_worker": max(peaks(rollout_actors), default=None),
            "reward_worker": max(peaks(reward_actors), default=None), "driver": peak_rss_mib(),
            # object-store pages the learner touched count in its RSS: how much of it they are now
            "learner_object_store_pages": learner_where["rss_shmem_mib"] if learner_where else None}


def _progress(total: int, enabled: bool, out):
    from tqdm import tqdm

    return tqdm(total=total, desc="RL", unit="step", disable=not enabled, file=out, dynamic_ncols=True,
                mininterval=0.5 if getattr(out, "isatty", lambda: False)() else 5.0)
