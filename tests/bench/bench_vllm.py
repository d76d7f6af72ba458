"""The vLLM rollout engine against raw vLLM and against the HF engine, side by side in one run.

    FLEETRL_CACHE=DIR python tests/bench/bench_vllm.py [--threads 2] [--rounds 2] [--lengths 32,256|none]

SmolLM2-135M-Instruct fp32 (prepared into ``$FLEETRL_CACHE/smollm2``), 16 chat prompts x 8
samples, temperature 1. Reported, every pair alternated round by round on the same prompts,
seeds and threads (this machine is noisy: read the ratios):

1. fleetrl's vLLM rollout path (``RolloutWorker.generate``: tokenise, engine, ``Group``s)
   / raw ``LLM.generate`` on the same engine instance: completion tokens/s;
2. vLLM engine / HF engine (``rollout.engine: hf``), completion tokens/s, for each length;
3. weight load, 135M fp32: the HF engine's in-place copy into its flat buffer vs the vLLM
   engine's copy + ``reload_weights`` + prefix-cache reset.
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


def arg(name: str, default: str) -> str:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def chat_prompts(tokenizer, n: int):
    from actors.types import Prompt

    rows = []
    for i in range(n):
        text = f"Write a short story about a robot who counts to {10 + 7 * i}."
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        rows.append(Prompt(uid=i, text=rendered, metadata={}))
    return rows


def tokens(groups) -> int:
    return sum(len(s.completion_ids) for g in groups for s in g.samples)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def raw_generate(worker, prompts, seed_base: int) -> int:
    """What the rollout path does, with vLLM's own API only: the same token ids, n, seeds and
    sampling parameters (``VLLMEngine.generate``'s, log-probs and no detokenisation included)."""
    from vllm import SamplingParams, TokensPrompt

    from actors.rollout.engines.vllm import prompt_seed

    cfg = worker.cfg
    ids = [worker.tokenizer(p.text)["input_ids"] for p in prompts]
    params = [SamplingParams(n=cfg.group_size, temperature=cfg.temperature, top_p=cfg.top_p,
                             max_tokens=worker.max_new_tokens, logprobs=0, detokenize=False,
                             seed=prompt_seed(seed_base, j))
              for j in range(len(ids))]
    outs = worker.engine.llm.generate([TokensPrompt(prompt_token_ids=x) for x in ids], params, use_tqdm=False)
    return sum(len(c.token_ids) for o in outs for c in o.outputs)


def main() -> None:
    import torch

    threads, rounds = int(arg("--threads", "2")), int(arg("--rounds", "2"))
    lengths = [int(x) for x in arg("--lengths", "32,256").split(",") if x.isdigit()]  # "none": weight load only
    torch.set_num_threads(threads)  # before vLLM starts: its CPU worker then freezes the setting
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    from actors.rollout.engines.vllm import VLLMConfig
    from actors.rollout.worker import RolloutConfig, RolloutWorker
    from tests.bench.smollm2_run import model_dir

    path = str(model_dir())
    common = dict(group_size=8, temperature=1.0, num_threads=threads, dtype="float32")  # as measured: fp32
    t0 = time.perf_counter()
    hf = RolloutWorker(path, RolloutConfig(engine="hf", **common), seed=0)
    hf_start = time.perf_counter() - t0
    t0 = time.perf_counter()
    # 128 sequences of <= 300 tokens in blocks of 128: 384 tokens x 46 KB each = 2.3 GB of KV cache
    vl = RolloutWorker(path, RolloutConfig(engine="vllm", vllm=VLLMConfig(kv_cache_gib=4.0), **common), seed=0)
    vllm_start = time.perf_counter() - t0
    prompts = chat_prompts(hf.tokenizer, 16)
    result = {"threads": threads, "rounds": rounds, "prompts": 16, "group_size": 8,
              "start_s": {"hf": round(hf_start, 1), "vllm": round(vllm_start, 1)}, "lengths": {}}
    print(f"start: HF engine {hf_start:.1f} s, vLLM engine {vllm_start:.1f} s", flush=True)
    vl.max_new_tokens = hf.max_new_tokens = (lengths or [8])[0]
    vl.generate(prompts[:2])  # first-call costs out of the timings
    hf.generate(prompts[:2])
    for length in lengths:
        vl.max_new_tokens = hf.max_new_tokens = length
        rates = {"path": [], "raw": [], "hf": []}
        for r in range(rounds):
            seed = (vl.seed * 1_000_003 + prompts[0].uid) % (2**63)
            groups, s = timed(lambda: vl.generate(prompts))
            rates["path"].append(tokens(groups) / s)
            n, s = timed(lambda: raw_generate(vl, prompts, seed))
            rates["raw"].append(n / s)
            groups, s = timed(lambda: hf.generate(prompts))
            rates["hf"].append(tokens(groups) / s)
            print(f"  {length} tokens, round {r}: path {rates['path'][-1]:.0f}, raw {rates['raw'][-1]:.0f}, "
                  f"HF {rates['hf'][-1]:.0f} tokens/s", flush=True)
        med = {k: statistics.median(v) for k, v in rates.items()}
        result["lengths"][length] = {**{f"{k}_tokens_per_s": round(v, 1) for k, v in med.items()},
                                     "path_over_raw": round(med["path"] / med["raw"], 3),
                                     "vllm_over_hf": round(med["path"] / med["hf"], 2)}
        print(f"{length} new tokens: vLLM path / raw LLM.generate {med['path'] / med['raw']:.3f}; "
              f"vLLM {med['path']:.0f} vs HF {med['hf']:.0f} tokens/s = {med['path'] / med['hf']:.2f}x", flush=True)
    result["weight_load"] = weight_load(hf, vl, rounds=3)
    print(json.dumps(result, indent=1))


def weight_load(hf, vl, rounds: int) -> dict:
    """Seconds to take one new version: the HF engine copies into its flat buffer (its
    parameters are views of it); the vLLM engine copies, then reloads its own copy."""
    src = {k: b.clone() for k, b in hf.flat.buffers.items()}
    copy_s, reload_s = [], []
    for _ in range(rounds):
        _, s = timed(lambda: [hf.flat.buffers[k].copy_(v) for k, v in src.items()])
        copy_s.append(s)
        _, s = timed(lambda: ([vl.flat.buffers[k].copy_(v) for k, v in src.items()],
                              vl.engine.load_weights(vl.model.named_parameters())))
        reload_s.append(s)
    out = {"hf_copy_s": round(statistics.median(copy_s), 3), "vllm_copy_and_reload_s": round(statistics.median(reload_s), 3),
           "bytes": sum(b.numel() * b.element_size() for b in src.values())}
    print(f"weight load ({out['bytes'] / 1e6:.0f} MB): HF copy {out['hf_copy_s']} s, vLLM copy + reload "
          f"{out['vllm_copy_and_reload_s']} s", flush=True)
    return out


if __name__ == "__main__":
    main()
