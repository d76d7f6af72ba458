"""Spine benchmarks, each a ratio measured side by side in one run.

    python tests/bench/bench_spine.py [rollout] [async] [sync] [control] [--quick]

- rollout: RolloutWorker.generate (and through a Ray actor) / raw model.generate, same batch
- async:   learner steps/s with max_staleness=1 / max_staleness=0, same config
- sync:    weight sync fetch+apply per worker / in-process copy of the same weights,
           for the tiny policy and a ~135M-parameter Llama (SmolLM2-135M shape)
- control: RL vs supervised training continued on the same labelled set for the
           same wall-clock time (held-out greedy accuracy)

This machine is noisy: runs alternate (A B A B ...) and medians are reported.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import sys
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

QUICK = "--quick" in sys.argv
RESULTS: dict[str, dict] = {}


def med(xs):
    return statistics.median(xs)


def report(name: str, **values):
    RESULTS[name] = values
    print(f"[{name}] " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()),
          flush=True)


def warm_policy() -> str:
    from actors.models.tiny import prepare_builtin_policy

    return str(prepare_builtin_policy()[0])


# ------------------------------------------------------------------------------------------------
def bench_rollout(policy: str):
    import ray

    from actors.runtime.rollout_actor import RolloutActor
    from actors.runtime.placement import actor_env
    from actors.rollout.worker import RolloutConfig, RolloutWorker
    from actors.tasks.registry import make_task

    # one thread, as the default rollout worker runs (rollout.num_threads=1)
    torch.set_num_threads(1)
    cfg = RolloutConfig(group_size=8, prompts_per_request=16, num_threads=1)
    worker = RolloutWorker(policy, cfg, default_max_new_tokens=5, seed=0)
    task = make_task("reverse")
    stream = task.prompt_stream()
    prompts = [next(stream) for _ in range(16)]
    model, tok = worker.model, worker.tokenizer
    enc = tok([p.text for p in prompts], return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"].repeat_interleave(8, 0), enc["attention_mask"].repeat_interleave(8, 0)

    def raw():
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                                 top_k=None, max_new_tokens=5, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        return int((out[:, ids.shape[1]:] != tok.pad_token_id).sum())

    def ours():
        return sum(len(s.completion_ids) for g in worker.generate(prompts) for s in g.samples)

    actor = ray.remote(RolloutActor).options(num_cpus=1, runtime_env=actor_env(1)).remote(
        policy, cfg, default_max_new_tokens=5, name="bench", seed=0)
    ray.get(actor.policy_version.remote())

    def via_actor():
        return sum(len(s.completion_ids) for g in ray.get(actor.generate.remote(prompts)) for s in g.samples)

    for f in (raw, ours, via_actor):
        f()  # warm-up
    reps = 5 if QUICK else 15
    t = {"raw": [], "worker": [], "actor": []}
    for _ in range(reps):
        for name, f in (("raw", raw), ("worker", ours), ("actor", via_actor)):
            t0 = time.perf_counter()
            n = f()
            t[name].append(n / (time.perf_counter() - t0))
    ray.kill(actor)
    report("rollout", raw_tokens_per_s=med(t["raw"]), worker_tokens_per_s=med(t["worker"]),
           actor_tokens_per_s=med(t["actor"]), worker_over_raw=med(t["worker"]) / med(t["raw"]),
           actor_over_raw=med(t["actor"]) / med(t["raw"]), batch="16 prompts x 8 samples, 5 new tokens, 1 thread")


# ------------------------------------------------------------------------------------------------
ASYNC_LAYOUTS = {
    # the default job: 2 rollout workers x 1 thread, learner 1 thread
    "default": [],
    # each phase may use both cores: learner 2 threads
    "shared": ["--learner.num_threads", "2"],
    # generation and learning on disjoint cores, as on separate GPUs: 1 rollout worker, learner 1 thread
    "partitioned": ["--rollout.num_workers", "1"],
}


def bench_async(policy: str):
    for layout, extra in ASYNC_LAYOUTS.items():
        _bench_async(policy, layout, extra)


def _bench_async(policy: str, layout: str, extra: list[str]):
    from learner.config import load_config
    from learner.driver.trainer import Trainer

    steps = 40 if QUICK else 120
    res = {0: [], 1: []}
    for rep in range(2 if QUICK else 3):
        for k in (0, 1):
            cfg = load_config(None, ["--model.path", policy, "--train.steps", str(steps), "--train.max_wall_s", "0",
                                     "--train.max_staleness", str(k), "--task.eval_size", "8", *extra])
            t = Trainer(cfg, f"/tmp/fleetrl-bench/async-{layout}-{k}-{rep}", out=io.StringIO(), progress=False)
            try:
                s = t.train()
            finally:
                t.shutdown()
            rows = t.history
            skip = 5  # ignore pipeline fill
            span = rows[-1]["time_s"] - rows[skip - 1]["time_s"]
            res[k].append((len(rows) - skip) / span)
            print(f"  {layout} max_staleness={k} rep {rep}: {res[k][-1]:.2f} steps/s, reward {s['reward_first']:.2f}->"
                  f"{s['reward_last']:.2f}", flush=True)
    report(f"async_{layout}", sync_steps_per_s=med(res[0]), async_steps_per_s=med(res[1]),
           async_over_sync=med(res[1]) / med(res[0]), steps=steps, samples_per_step=128)


# ------------------------------------------------------------------------------------------------
class SyncPeer:
    """A Ray actor holding a model as FlatParams: publishes or receives weights."""

    def __init__(self, config: dict, threads: int = 1):
        from transformers import LlamaConfig, LlamaForCausalLM

        from actors.weights.flat import FlatParams
        from actors.weights.object_store import WeightPublisher, WeightReceiver

        torch.set_num_threads(threads)
        torch.manual_seed(0)
        with torch.device("cpu"):
            self.model = LlamaForCausalLM(LlamaConfig(**config))
        self.flat = FlatParams(self.model)
        self.pub = WeightPublisher(self.flat)
        self.recv = WeightReceiver(self.flat)
        self.scratch = {k: v.clone() for k, v in self.flat.buffers.items()}

    def nbytes(self):
        return sum(b.numel() * b.element_size() for b in self.flat.buffers.values())

    def publish(self):
        self.pub.bump()
        t0 = time.perf_counter()
        import ray

        p = self.pub.publish(ray.put)
        return p, time.perf_counter() - t0

    def apply(self, payload):
        t0 = time.perf_counter()
        import ray

        assert self.recv.apply(payload, lambda refs: dict(zip(refs, ray.get(list(refs.values())))))
        return time.perf_counter() - t0

    def floor(self):
        """In-process copy of the same bytes: the cost any method must pay."""
        t0 = time.perf_counter()
        for k, v in self.flat.buffers.items():
            v.copy_(self.scratch[k])
        return time.perf_counter() - t0

    def state_dict_put(self):
        import ray

        # own storage per tensor, as an ordinary model has: pickling a view of
        # our flat buffer would serialise the whole buffer once per tensor
        sd = {k: v.clone() for k, v in self.model.state_dict().items()}
        t0 = time.perf_counter()
        ref = ray.put(sd)
        return [ref], time.perf_counter() - t0

    def state_dict_apply(self, refs):
        import ray

        t0 = time.perf_counter()
        sd = ray.get(refs[0])
        self.model.load_state_dict(sd)
        del sd
        return time.perf_counter() - t0


TINY = dict(vocab_size=18, hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=True)
SMOL = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True)


def bench_sync():
    import ray

    Peer = ray.remote(SyncPeer).options(num_cpus=0.25)
    for label, config in (("tiny", TINY), ("135M", SMOL)):
        if QUICK and label == "135M":
            continue
        learner = Peer.remote(config)
        readers = [Peer.remote(config) for _ in range(2)]
        nbytes = ray.get(learner.nbytes.remote())
        ray.get([r.nbytes.remote() for r in readers])
        flat_apply, floor, publish, naive = [], [], [], []
        for _ in range(3 if QUICK else 6):
            payload, t_pub = ray.get(learner.publish.remote())
            publish.append(t_pub)
            flat_apply += ray.get([r.apply.remote(payload) for r in readers])
            del payload
            floor += ray.get([r.floor.remote() for r in readers])
            refs, _ = ray.get(learner.state_dict_put.remote())
            naive += ray.get([r.state_dict_apply.remote(refs) for r in readers])
            del refs
        report(f"weight_sync_{label}", params_mb=nbytes / 2**20, publish_s=med(publish),
               apply_per_worker_s=med(flat_apply), in_process_copy_s=med(floor),
               apply_over_copy=med(flat_apply) / med(floor), state_dict_put_apply_s=med(naive),
               state_dict_over_copy=med(naive) / med(floor), readers=2)
        for a in [learner, *readers]:
            ray.kill(a)


# ------------------------------------------------------------------------------------------------
def bench_control(policy: str):
    """RL for T seconds vs supervised training on the same labelled set for the same T."""
    import random

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.tasks.evaluate import greedy_accuracy
    from actors.tasks.registry import make_task
    from actors.models.tiny import supervised_steps
    from learner.config import ModelConfig, load_config
    from learner.driver.trainer import Trainer

    torch.set_num_threads(2)
    task = make_task("reverse")
    evalset = task.eval_set(200)
    seconds = 40.0 if QUICK else 100.0
    cfg = load_config(None, ["--model.path", policy, "--train.steps", "100000", "--train.max_wall_s", str(seconds)])
    t = Trainer(cfg, "/tmp/fleetrl-bench/control-rl", out=io.StringIO(), progress=False)
    try:
        rl = t.train()
    finally:
        t.shutdown()
    labelled = task.labelled_set(ModelConfig().warm_start_examples)
    model = AutoModelForCausalLM.from_pretrained(policy)
    tok = AutoTokenizer.from_pretrained(policy)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    before = greedy_accuracy(model, tok, evalset, max_new_tokens=5)
    t0, steps, best = time.perf_counter(), 0, before
    while time.perf_counter() - t0 < rl["rl_s"]:
        supervised_steps(model, tok, labelled, opt, steps=10, batch_size=128, rng=rng)
        steps += 10
        best = max(best, greedy_accuracy(model, tok, evalset, max_new_tokens=5))
    sft = greedy_accuracy(model, tok, evalset, max_new_tokens=5)
    report("rl_vs_supervised", seconds=rl["rl_s"], eval_start=rl["eval_before"], rl_eval=rl["eval_after"],
           rl_steps=rl["steps"], supervised_eval=sft, supervised_best_eval=best, supervised_steps=steps,
           labelled_examples=len(labelled))


def main():
    import ray

    which = [a for a in sys.argv[1:] if not a.startswith("--")] or ["rollout", "async", "sync", "control"]
    ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.2", include_dashboard=False,
             object_store_memory=2_000_000_000,
             log_to_driver=False)
    policy = warm_policy()
    for name in which:
        {"rollout": lambda: bench_rollout(policy), "async": lambda: bench_async(policy), "sync": bench_sync,
         "control": lambda: bench_control(policy)}[name]()
    print(json.dumps(RESULTS, indent=2))
    ray.shutdown()


if __name__ == "__main__":
    main()
