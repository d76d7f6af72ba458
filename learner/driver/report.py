"""What a run reports: a metrics row per step, the progress bar, the summary, peak memory.

``RunReport`` appends one JSON row per step to ``metrics.jsonl`` (the
learner's metrics plus timing and the coordinator's counters) and keeps the
history the summary is computed from. ``summary.json`` is written at the end.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import ray

from actors.runtime.placement import peak_rss_mib

COUNTERS = ("produced", "trained", "dropped", "buffered_groups")


class RunReport:
    def __init__(self, run_dir: Path, *, total_steps: int, progress: bool, out, log_every: int, resume: bool):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.file = self.path.open("a" if resume else "w")
        self.bar = _progress(total_steps, progress, out)
        self.progress, self.out, self.log_every = progress, out, log_every
        self.history: list[dict] = []
        self.trained = 0

    def step(self, step: int, version: int, metrics: dict, counters: dict, *, elapsed_s: float, sample_s: float,
             update_sync_s: float) -> dict:
        """Record step ``step``: one metrics row, the progress bar, a log line every ``log_every``."""
        self.trained += metrics["samples"]
        row = {"step": step, "policy_version": version, "time_s": round(elapsed_s, 3), "sample_s": sample_s,
               "update_sync_s": update_sync_s, "samples_per_s": self.trained / elapsed_s, **metrics,
               **{k: counters[k] for k in COUNTERS}}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        self.history.append(row)
        self.bar.update(1)
        self.bar.set_postfix(reward=f"{metrics['reward_mean']:.3f}", v=version, sps=f"{row['samples_per_s']:.0f}",
                             refresh=False)  # the bar itself redraws at most every mininterval
        if not self.progress and self.log_every and step % self.log_every == 0:
            print(f"step {step} reward {metrics['reward_mean']:.3f} samples/s {row['samples_per_s']:.0f}",
                  file=self.out, flush=True)
        return row

    def close(self) -> None:
        self.bar.close()
        self.file.close()

    def reward_first_last(self) -> tuple[float, float]:
        """Mean training reward of the first and the last tenth of the steps."""
        rewards = [r["reward_mean"] for r in self.history]
        k = max(1, len(rewards) // 10)
        if not rewards:
            return math.nan, math.nan
        return sum(rewards[:k]) / k, sum(rewards[-k:]) / k


def peak_memory(learner, rollout_actors: list, reward_actors: list, timeout_s: float = 30.0) -> dict:
    """Peak resident memory (MiB) of the learner, the largest rollout worker and reward
    worker, and the driver (Ray's own processes are not included). Best effort: an
    actor that died or does not answer is left out (None when none of a kind answers);
    a finished run never fails here."""
    def peaks(actors: list) -> list[float]:
        refs = [a.where.remote() for a in actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        out = []
        for r in ready:
            try:
                out.append(ray.get(r)["peak_rss_mib"])
            except ray.exceptions.RayError:
                pass
        return out

    learner_peak = peaks([learner])
    return {"learner": learner_peak[0] if learner_peak else None,
            "rollout_worker": max(peaks(rollout_actors), default=None),
            "reward_worker": max(peaks(reward_actors), default=None), "driver": peak_rss_mib()}


def _progress(total: int, enabled: bool, out):
    from tqdm import tqdm

    return tqdm(total=total, desc="RL", unit="step", disable=not enabled, file=out, dynamic_ncols=True,
                mininterval=0.5 if getattr(out, "isatty", lambda: False)() else 5.0)
