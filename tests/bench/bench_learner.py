"""Learner throughput vs a bare torch loop, and checkpoint save/load time.

    python tests/bench/bench_learner.py [--quick]

- tokens/s of ``Learner.train_step`` (fwd + bwd + AdamW step, our batching,
  padding, advantages and loss) vs a bare loop doing ``model(...)`` ->
  cross-entropy-weighted loss -> ``backward`` -> ``AdamW.step`` on the same
  padded batch, alternating rounds, for the tiny policy and a 4-layer h256 Llama;
- checkpoint ``save_state`` / ``load_state`` seconds for the tiny policy and a
  135M-parameter Llama (SmolLM2-135M shape, random weights).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

QUICK = "--quick" in sys.argv
RESULTS = {}


def report(name, **values):
    RESULTS[name] = values
    print(f"[{name}] " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()),
          flush=True)


def build(path: Path, vocab_size: int | None = None, **cfg) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    from actors.models.tiny import build_char_tokenizer

    tok = build_char_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size or len(tok), pad_token_id=0, eos_token_id=1, bos_token_id=None,
                                 tie_word_embeddings=True, **cfg)).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def make_groups(policy: str, n_prompts=16, group=8, new_tokens=16):
    from actors.rollout.worker import RolloutConfig, RolloutWorker
    from actors.tasks.registry import make_task

    w = RolloutWorker(policy, RolloutConfig(group_size=group, max_new_tokens=new_tokens, num_threads=2), seed=0)
    stream = make_task("reverse").prompt_stream()
    groups = w.generate([next(stream) for _ in range(n_prompts)])
    for g in groups:
        for k, s in enumerate(g.samples):
            s.reward = float(k % 2)  # every group mixed: nothing is skipped
    return groups


def bench_throughput(label: str, policy: str):
    from learner.batch import TrainBatch, pad_micro_batch
    from learner.learner import Learner, LearnerConfig

    torch.set_num_threads(2)
    groups = make_groups(policy)
    learner = Learner(policy, LearnerConfig(num_threads=2, micro_batch_size=128), total_steps=1000)
    batch = TrainBatch.from_groups(groups)
    tokens = sum(len(s) for s in batch.sequences)
    ids, attn, pos, targets, old, cmask, keep = pad_micro_batch(batch, list(range(len(batch))), 0, "cpu")
    from transformers import AutoModelForCausalLM

    bare = AutoModelForCausalLM.from_pretrained(policy)
    opt = torch.optim.AdamW(bare.parameters(), lr=5e-4)
    adv = torch.randn(len(batch))

    def bare_step():
        pred = bare(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=keep).logits
        logp = torch.log_softmax(pred, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        loss = -(adv.unsqueeze(-1) * logp * cmask).sum() / len(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def ours():
        learner.train_step(groups)

    for f in (bare_step, ours):
        f()
    reps = 3 if QUICK else 10
    t = {"bare": [], "ours": []}
    for _ in range(reps):
        for name, f in (("bare", bare_step), ("ours", ours)):
            t0 = time.perf_counter()
            f()
            t[name].append(tokens / (time.perf_counter() - t0))
    report(f"learner_{label}", bare_tokens_per_s=statistics.median(t["bare"]),
           learner_tokens_per_s=statistics.median(t["ours"]),
           ratio=statistics.median(t["ours"]) / statistics.median(t["bare"]), batch=f"{len(batch)} samples")


def bench_checkpoint(label: str, policy: str):
    from learner.learner import Learner, LearnerConfig

    learner = Learner(policy, LearnerConfig(num_threads=2), total_steps=10)
    for p in learner.model.parameters():  # give AdamW its state (exp_avg, exp_avg_sq), as after training
        p.grad = torch.zeros_like(p)
    learner.optimizer.step()
    save, load = [], []
    for _ in range(2 if QUICK else 3):
        d = tempfile.mkdtemp(prefix="fleetrl-ckpt-")
        t0 = time.perf_counter()
        learner.save_state(d)
        save.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        learner.load_state(d)
        load.append(time.perf_counter() - t0)
    report(f"checkpoint_{label}", save_s=statistics.median(save), load_s=statistics.median(load),
           params=sum(p.numel() for p in learner.model.parameters()))


def main():
    tmp = Path(tempfile.mkdtemp(prefix="fleetrl-bench-learner-"))
    tiny = build(tmp / "tiny", hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=64)
    small = build(tmp / "small", hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=64)
    bench_throughput("tiny", tiny)
    bench_throughput("h256x4", small)
    bench_checkpoint("tiny", tiny)
    smol = build(tmp / "smol", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, max_position_embeddings=2048)
    bench_checkpoint("135M", smol)
    print(json.dumps(RESULTS, indent=2))


if __name__ == "__main__":
    main()
