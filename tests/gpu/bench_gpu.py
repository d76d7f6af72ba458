"""Learner MFU and rollout tokens/s on a GPU, for a ~0.5B-parameter Llama built from a config.

    python tests/gpu/bench_gpu.py [--json OUT.json] [--peak-tflops X]
    python tests/gpu/bench_gpu.py --device cpu --size tiny      # dry run of this script on CPU

Random weights (throughput does not depend on them), built offline: hidden 1024,
24 layers, 16 heads, FFN 4864, vocab 32,000, tied embeddings (~0.49B parameters,
counted from the model). Everything goes through fleetrl's own classes:

* **learner**: ``Learner.train_step`` (fp32 master weights, bf16 autocast, fused
  AdamW) on synthetic groups (prompt + completion tokens, mixed rewards so every
  sample is trained); MFU = 6 · N · tokens / step time / peak, N = all
  parameters, tokens = prompt + completion tokens of the batch, peak = the card's
  dense bf16 tensor throughput (looked up by device name, or ``--peak-tflops``);
* **rollout**: ``RolloutWorker.generate`` (bf16 weights, HF ``generate`` with
  sampling, behaviour log-probs) — completion tokens per second.

Needs a CUDA build of torch (``torch.cuda.is_available()``); about 1–2 minutes on
an H100/H200.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# dense bf16 tensor-core peak, TFLOP/s (no sparsity), by a substring of torch.cuda.get_device_name()
BF16_PEAK_TFLOPS = {
    "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "GH200": 989.0, "H800": 989.0,
    "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0, "B200": 2250.0,
}

SIZES = {  # name -> (LlamaConfig kwargs, learner batch, rollout shape)
    "0.5b": (dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                  intermediate_size=4864, vocab_size=32000, max_position_embeddings=2048),
             dict(samples=64, prompt_len=128, completion_len=384, micro_batch=16, warmup=2, steps=5),
             dict(prompts=32, group=8, new_tokens=128, calls=2)),
    "tiny": (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                  intermediate_size=256, vocab_size=512, max_position_embeddings=256),
             dict(samples=8, prompt_len=16, completion_len=16, micro_batch=4, warmup=1, steps=2),
             dict(prompts=2, group=2, new_tokens=8, calls=1)),
}


def peak_tflops(name: str) -> float | None:
    for key in sorted(BF16_PEAK_TFLOPS, key=len, reverse=True):
        if key.lower() in name.lower():
            return BF16_PEAK_TFLOPS[key]
    return None


def build_policy(path: Path, model_kwargs: dict, device: str) -> int:
    """A random Llama saved as a from_pretrained folder (with the char tokenizer); returns N."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from actors.models.tiny import build_char_tokenizer

    tok = build_char_tokenizer()
    cfg = LlamaConfig(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                      tie_word_embeddings=True, **model_kwargs)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU: seconds instead of a minute on CPU
        model = LlamaForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())  # tied lm_head counted once
    model.save_pretrained(path)
    tok.save_pretrained(path)
    del model
    return n


def synthetic_groups(samples: int, prompt_len: int, completion_len: int, vocab: int, group: int = 8):
    from actors.types import Group, Prompt, Sample

    g = torch.Generator().manual_seed(0)
    groups = []
    for p in range(samples // group):
        prompt_ids = torch.randint(3, vocab, (prompt_len,), generator=g).tolist()
        out = []
        for k in range(group):
            ids = torch.randint(3, vocab, (completion_len,), generator=g).tolist()
            out.append(Sample(completion_ids=ids, completion_text="", logprobs=[-10.0] * completion_len,
                              policy_version=0, finished=False, reward=float(k % 2)))
        groups.append(Group(prompt=Prompt(uid=p, text=""), prompt_ids=prompt_ids, samples=out, worker="bench"))
    return groups


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def bench_learner(path: str, device: str, shape: dict, vocab: int, n_params: int, peak: float | None) -> dict:
    from learner.learner import Learner, LearnerConfig

    cfg = LearnerConfig(device=device, num_gpus=1.0 if device == "cuda" else 0.0, dtype="bfloat16", lr=1e-6,
                        micro_batch_size=shape["micro_batch"], num_threads=os.cpu_count() or 1)
    t0 = time.perf_counter()
    learner = Learner(path, cfg, total_steps=1000, publish_dtype="bfloat16")
    load_s = time.perf_counter() - t0
    groups = synthetic_groups(shape["samples"], shape["prompt_len"], shape["completion_len"], vocab)
    tokens = shape["samples"] * (shape["prompt_len"] + shape["completion_len"])
    for _ in range(shape["warmup"]):
        m = learner.train_step(groups)
    sync(device)
    times = []
    for _ in range(shape["steps"]):
        t0 = time.perf_counter()
        m = learner.train_step(groups)  # ends with float(...) of the loss: synchronised
        sync(device)
        times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    t0 = time.perf_counter()
    learner.publisher.wire()  # fp32 master -> bf16 wire cast, what every weight sync starts with
    sync(device)
    cast_s = time.perf_counter() - t0
    flops = 6 * n_params * tokens
    out = {"load_s": round(load_s, 2), "samples": shape["samples"], "tokens_per_step": tokens,
           "micro_batch": shape["micro_batch"], "step_s_median": round(step_s, 4),
           "step_s_all": [round(t, 4) for t in times], "tokens_per_s": round(tokens / step_s, 1),
           "achieved_tflops": round(flops / step_s / 1e12, 2), "loss_finite": m["loss"] == m["loss"],
           "wire_cast_s": round(cast_s, 4),
           "peak_bf16_tflops": peak, "mfu": round(flops / step_s / (peak * 1e12), 4) if peak else None}
    if device == "cuda":
        out["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del learner
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def bench_rollout(path: str, device: str, shape: dict) -> dict:
    from actors.rollout.worker import RolloutConfig, RolloutWorker
    from actors.types import Prompt

    cfg = RolloutConfig(device=device, num_gpus=1.0 if device == "cuda" else 0.0, dtype="bfloat16",
                        group_size=shape["group"], max_new_tokens=shape["new_tokens"], temperature=1.0,
                        num_threads=os.cpu_count() or 1)
    worker = RolloutWorker(path, cfg, default_max_new_tokens=shape["new_tokens"], name="bench", seed=0)
    prompts = [Prompt(uid=i, text=f"{1000 + i}=") for i in range(shape["prompts"])]
    worker.generate(prompts[:2])  # warm-up (kernels, allocator)
    sync(device)
    rates, tokens = [], 0
    for _ in range(shape["calls"]):
        t0 = time.perf_counter()
        groups = worker.generate(prompts)
        sync(device)
        dt = time.perf_counter() - t0
        n = sum(len(s.completion_ids) for g in groups for s in g.samples)
        tokens += n
        rates.append(n / dt)
    out = {"sequences_per_call": shape["prompts"] * shape["group"], "max_new_tokens": shape["new_tokens"],
           "tokens_generated": tokens, "tokens_per_s": round(sorted(rates)[len(rates) // 2], 1),
           "tokens_per_s_all": [round(r, 1) for r in rates], "dtype": str(worker.dtype)}
    if device == "cuda":
        out["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the device, TFLOP/s")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"bench_gpu: no CUDA device visible to torch {torch.__version__} (CUDA build: "
              f"{torch.version.cuda or 'none, a CPU-only wheel'}); install a CUDA build of torch on a GPU machine "
              f"(or --device cpu --size tiny for a dry run)", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_kwargs, learner_shape, rollout_shape = SIZES[args.size]
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    peak = args.peak_tflops or (peak_tflops(name) if args.device == "cuda" else None)
    t_start = time.perf_counter()
    results: dict = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "size": args.size,
                     "model": model_kwargs}
    with tempfile.TemporaryDirectory(prefix="fleetrl-bench-") as tmp:
        t0 = time.perf_counter()
        n = build_policy(Path(tmp), model_kwargs, args.device)
        results["params"] = n
        results["build_s"] = round(time.perf_counter() - t0, 2)
        print(f"model: Llama {model_kwargs['num_hidden_layers']} layers, hidden {model_kwargs['hidden_size']}, "
              f"vocab {model_kwargs['vocab_size']}: {n / 1e6:.1f}M parameters (built + saved in "
              f"{results['build_s']}s) on {name}", flush=True)
        results["learner"] = lr = bench_learner(tmp, args.device, learner_shape, model_kwargs["vocab_size"], n, peak)
        mfu = f"{100 * lr['mfu']:.1f}%" if lr["mfu"] is not None else "n/a (unknown peak: --peak-tflops)"
        print(f"learner: {lr['samples']} samples x {lr['tokens_per_step'] // lr['samples']} tokens, micro-batch "
              f"{lr['micro_batch']}: {lr['step_s_median']:.3f} s/step, {lr['tokens_per_s']:.0f} tokens/s, "
              f"{lr['achieved_tflops']} TFLOP/s (6·N·tokens) -> MFU {mfu} of {peak} TFLOP/s bf16 peak", flush=True)
        results["rollout"] = ro = bench_rollout(tmp, args.device, rollout_shape)
        print(f"rollout: {ro['sequences_per_call']} sequences x {ro['max_new_tokens']} new tokens "
              f"({ro['dtype']}): {ro['tokens_per_s']:.0f} tokens/s", flush=True)
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    print(f"total {results['wall_s']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
