"""Learner ranks: 2 FSDP2 ranks vs 1 on the same global batch, tokens/s and peak memory per rank.

    python tests/bench/bench_ranks.py [--model smollm2|builtin] [--samples 32] [--tokens 48] [--steps 3] [--rounds 2]

Real Ray actors (``learner.actor.start_learner``), gloo on CPU, 1 thread per rank; the batch
is ``tests/bench/bench_lora.py``'s (an arithmetic chat prompt + random completion ids,
behaviour log-probs = the learner's own, rewards alternating in each group). Rounds alternate
1 rank and 2 ranks. On 2 shared cores expect no speed-up (both ranks share the cores and
add an all-gather and a reduce-scatter per layer and pass); the point is the memory per rank
(parameters, gradients and AdamW state sharded; each rank still loads the whole policy
once before sharding, so the peak includes that) and that the update is the same
(``tests/test_ranks.py``).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.bench.bench_lora import arg, on_policy_groups, policy_path  # noqa: E402


def batch(path: str, samples: int, tokens: int) -> list:
    """The groups, their behaviour log-probs the policy's own (a plain one-process learner)."""
    from learner.learner import Learner, LearnerConfig

    return on_policy_groups(Learner(path, LearnerConfig(num_threads=1), total_steps=1), samples, tokens)


def measure(path: str, groups: list, n: int, steps: int) -> dict:
    import ray

    from learner.actor import start_learner
    from learner.learner import LearnerConfig

    cfg = LearnerConfig(num_threads=1, num_cpus=0.5, micro_batch_size=8, lr=1e-5, num_workers=n)
    ranks = start_learner(path, cfg, total_steps=100)
    try:
        times = []
        for _ in range(steps + 1):  # the first warms up
            t0 = time.perf_counter()
            ray.get(ranks.rank0.train_step.remote(groups))
            times.append(time.perf_counter() - t0)
        where = ray.get(ranks.rank0.ranks_where.remote()) if n > 1 else [ray.get(ranks.rank0.where.remote())]
        seq_tokens = sum(len(g.prompt_ids) + len(s.completion_ids) for g in groups for s in g.samples)
        step = statistics.median(times[1:])
        return {"step_s": step, "tokens_per_s": seq_tokens / step, "peak_rss_mib": [w["peak_rss_mib"] for w in where]}
    finally:
        ranks.kill()


def main() -> None:
    from learner.cli import init_ray

    model = arg("--model", "smollm2")
    samples, tokens = int(arg("--samples", "32")), int(arg("--tokens", "48"))
    steps, rounds = int(arg("--steps", "3")), int(arg("--rounds", "2"))
    path = policy_path(model)
    groups = batch(path, samples, tokens)
    init_ray(None)
    rows: dict[int, list[dict]] = {1: [], 2: []}
    for _ in range(rounds):
        for n in rows:
            rows[n].append(measure(path, groups, n, steps))
    print(f"# {model}: {samples} samples x {tokens} completion tokens, 1 thread per rank, medians of {rounds} rounds x "
          f"{steps} steps")
    for n, rs in rows.items():
        peaks = [max(r["peak_rss_mib"][k] for r in rs) for k in range(n)]
        print(f"  {n} rank(s): step {statistics.median(r['step_s'] for r in rs):.2f} s, "
              f"{statistics.median(r['tokens_per_s'] for r in rs):.0f} tokens/s, peak RSS per rank (MiB) {peaks}")
    ratio = statistics.median(r["tokens_per_s"] for r in rows[2]) / statistics.median(r["tokens_per_s"] for r in rows[1])
    print(f"  2 ranks / 1 rank, tokens/s: {ratio:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
