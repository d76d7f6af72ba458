"""A served reward model over gRPC vs the same model in-process, same batches.

    python tests/bench/bench_reward_grpc.py [--quick]

For two HF sequence-classification reward models built locally (tiny: hidden
32 / 1 layer; small: hidden 256 / 4 layers), the server runs as a real
`fleetrl reward serve --model DIR` subprocess on 127.0.0.1. Reports
samples/s for batches of 32 over gRPC vs in-process (alternating rounds,
medians), and p50/p99 latency of Score with 16 concurrent clients.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

QUICK = "--quick" in sys.argv
BATCH = 32


def build(path: Path, hidden: int, layers: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from actors.models.tiny import build_char_tokenizer

    tok = build_char_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128, num_labels=1,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    LlamaForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def batch(i: int):
    from protos import reward_pb2

    prompts = [f"{(i * BATCH + j) % 9000 + 1000}=" for j in range(BATCH)]
    completions = [p[:-1][::-1] for p in prompts]
    req = reward_pb2.ScoreRequest(samples=[reward_pb2.Sample(prompt=p, completion=c) for p, c in zip(prompts, completions)])
    return prompts, completions, req


def bench_model(label: str, path: Path) -> dict:
    from actors.reward.hf import HFRewardModel
    from protos import reward_pb2_grpc

    env = dict(os.environ, FLEETRL_TOKEN="")
    server = subprocess.Popen([sys.executable, "-m", "learner.cli", "reward", "serve", "--model", str(path),
                               "--port", "0", "--batch-size", str(BATCH)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        address = server.stdout.readline().split()[-1]
        stub = reward_pb2_grpc.RewardModelStub(grpc.insecure_channel(address))
        local = HFRewardModel(str(path), batch_size=BATCH)
        reqs = [batch(i) for i in range(8)]
        for p, c, r in reqs[:2]:  # warm-up both paths
            local.score(p, c)
            stub.Score(r, timeout=60)
        rounds = 3 if QUICK else 7
        per_round = 10 if QUICK else 30
        grpc_sps, local_sps = [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for k in range(per_round):
                p, c, _ = reqs[k % len(reqs)]
                local.score(p, c)
            local_sps.append(per_round * BATCH / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for k in range(per_round):
                stub.Score(reqs[k % len(reqs)][2], timeout=60)
            grpc_sps.append(per_round * BATCH / (time.perf_counter() - t0))
        # 16 concurrent clients, each with its own channel
        latencies: list[float] = []
        lock = threading.Lock()
        duration = 4.0 if QUICK else 10.0
        stop = time.perf_counter() + duration

        def client(i: int):
            s = reward_pb2_grpc.RewardModelStub(grpc.insecure_channel(address))
            mine = []
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                s.Score(reqs[i % len(reqs)][2], timeout=120)
                mine.append(time.perf_counter() - t0)
            with lock:
                latencies.extend(mine)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        t_start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t_start
        latencies.sort()
        q = lambda f: latencies[min(len(latencies) - 1, int(f * len(latencies)))]  # noqa: E731
        res = {"model": label, "local_samples_per_s": statistics.median(local_sps),
               "grpc_samples_per_s": statistics.median(grpc_sps),
               "grpc_over_local": statistics.median(grpc_sps) / statistics.median(local_sps),
               "concurrent16_samples_per_s": len(latencies) * BATCH / wall,
               "p50_ms": q(0.50) * 1000, "p99_ms": q(0.99) * 1000, "calls": len(latencies)}
        print(f"[{label}] " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()),
              flush=True)
        return res
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)


def main():
    tmp = Path(tempfile.mkdtemp(prefix="fleetrl-bench-rm-"))
    results = [bench_model("tiny (h32, 1 layer)", build(tmp / "tiny", 32, 1)),
               bench_model("small (h256, 4 layers)", build(tmp / "small", 256, 4))]
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
