"""Does learning hold under staleness? Off-policy corrections on the default job, several seeds.

    python tests/bench/bench_staleness.py [--seconds 70] [--seeds 0,1,2] [--staleness 0,1,4]
                                          [--methods behaviour,decoupled-token,decoupled-sequence,tis]

Each run is ``fleetrl train`` (a subprocess, its own local Ray) on the embedded default job
(the built-in policy's warm start, held-out greedy accuracy 0.295) for ``--seconds`` of RL with
``train.max_staleness S``, ``train.seed K`` and one off-policy correction:

- ``behaviour``: PPO's ratio to the behaviour policy (the default);
- ``decoupled-token`` / ``decoupled-sequence``: decoupled PPO (clip against the learner's policy
  at consumption time, truncated importance weight to the behaviour policy, ``is_cap`` 2), the
  weight per token or per sequence (the product of the token ratios);
- ``tis``: the vanilla policy gradient with truncated importance weights per token.

At staleness 0 every correction is the plain on-policy update, so only ``behaviour`` runs.
Reported per setting: held-out greedy accuracy after the run and samples/s, mean and range over
the seeds, and the importance weights' mean, effective sample size and share below 0.1
(``is_weight_*`` in ``metrics.jsonl``), averaged over the steps.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.bench.bench_lora import arg  # noqa: E402 - after the path: run as a script
FLEETRL = [sys.executable, "-m", "learner.cli"]
METHODS = {
    "behaviour": [],
    "decoupled-token": ["--learner.off_policy", "decoupled", "--learner.is_level", "token"],
    "decoupled-sequence": ["--learner.off_policy", "decoupled", "--learner.is_level", "sequence"],
    "tis": ["--learner.policy_loss", "vanilla", "--learner.off_policy", "tis"],
}


def run(out: Path, seconds: float, staleness: int, seed: int, method: str) -> dict:
    cmd = [*FLEETRL, "train", "--output-dir", str(out), "--no-progress", "--train.max_wall_s", str(seconds),
           "--train.max_staleness", str(staleness), "--train.seed", str(seed), "--watch.plot", "false",
           *METHODS[method]]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=seconds + 600)
    if r.returncode != 0:
        raise RuntimeError(f"{method} staleness {staleness} seed {seed} failed: {r.stderr[-2000:]}")
    s = json.loads((out / "summary.json").read_text())
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    mean = lambda k: round(statistics.mean(v for x in rows if (v := x.get(k)) is not None), 4) if any(  # noqa: E731
        x.get(k) is not None for x in rows) else None
    return {"method": method, "staleness": staleness, "seed": seed, "eval_before": s["eval_before"],
            "eval_after": s["eval_after"], "samples_per_s": s["samples_per_s"], "steps": s["steps"],
            "staleness_mean": mean("staleness_mean"), "is_weight_mean": mean("is_weight_mean"),
            "is_weight_ess": mean("is_weight_ess"), "is_weight_small": mean("is_weight_small")}


def summarize(results: list[dict]) -> list[dict]:
    table = []
    for key in dict.fromkeys((r["staleness"], r["method"]) for r in results):
        rs = [r for r in results if (r["staleness"], r["method"]) == key]
        acc, sps = [r["eval_after"] for r in rs], [r["samples_per_s"] for r in rs]
        avg = lambda k: round(statistics.mean(r[k] for r in rs if r[k] is not None), 3) if any(  # noqa: E731
            r[k] is not None for r in rs) else None
        table.append({"staleness": key[0], "method": key[1], "seeds": len(rs),
                      "accuracy_mean": round(statistics.mean(acc), 3), "accuracy_range": [min(acc), max(acc)],
                      "samples_per_s_mean": round(statistics.mean(sps), 1), "is_weight_mean": avg("is_weight_mean"),
                      "is_weight_ess": avg("is_weight_ess"), "is_weight_small": avg("is_weight_small")})
    return table


def main() -> None:
    seconds = float(arg("--seconds", "70"))
    seeds = [int(x) for x in arg("--seeds", "0,1,2").split(",")]
    stalenesses = [int(x) for x in arg("--staleness", "0,1,4").split(",")]
    methods = arg("--methods", ",".join(METHODS)).split(",")
    tmp = Path(tempfile.mkdtemp(prefix="fleetrl-staleness-"))
    results = []
    for seed in seeds:  # seeds outermost: a slow spell of the machine hits every setting alike
        for staleness in stalenesses:
            for method in (methods if staleness > 0 else ["behaviour"]):
                r = run(tmp / f"{method}-s{staleness}-seed{seed}", seconds, staleness, seed, method)
                results.append(r)
                print(json.dumps(r), flush=True)
    print(json.dumps({"seconds": seconds, "table": summarize(results)}, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
