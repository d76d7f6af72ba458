"""Rollout scaling and weight broadcast vs the number of rollout workers.

    python tests/bench/bench_fleet.py [--quick]

- rollout samples/s with 1, 2 and 4 workers (1 torch thread each), each worker
  generating the same 16 prompts x 8 samples batch back to back; ratio to 1
  worker. This machine has 2 cores: beyond 2 workers the CPU caps it.
- weight broadcast: publish once, N workers fetch + apply concurrently; time
  until all N have applied, N = 1 vs 4, for the tiny policy and a 135M Llama.
Rounds alternate; medians are reported.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

QUICK = "--quick" in sys.argv
RESULTS: dict[str, dict] = {}


def report(name, **values):
    RESULTS[name] = values
    print(f"[{name}] " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()),
          flush=True)


def bench_rollout_scaling(policy: str):
    import ray

    from actors.runtime.rollout_actor import RolloutActor
    from actors.runtime.placement import actor_env
    from actors.rollout.worker import RolloutConfig
    from actors.tasks.registry import make_task

    cfg = RolloutConfig(group_size=8, num_threads=1)
    Actor = ray.remote(RolloutActor).options(num_cpus=0.25, runtime_env=actor_env(1))
    actors = [Actor.remote(policy, cfg, default_max_new_tokens=5, name=f"b{i}", seed=i) for i in range(4)]
    ray.get([a.policy_version.remote() for a in actors])
    stream = make_task("reverse").prompt_stream()
    prompts = [next(stream) for _ in range(16)]
    ray.get([a.generate.remote(prompts) for a in actors])  # warm-up
    seconds = 3.0 if QUICK else 8.0
    rates = {1: [], 2: [], 4: []}
    for _ in range(2 if QUICK else 3):
        for n in (1, 2, 4):
            group = actors[:n]
            done = 0
            t0 = time.perf_counter()
            pending = {a.generate.remote(prompts): a for a in group}
            while time.perf_counter() - t0 < seconds:
                ready, _ = ray.wait(list(pending), num_returns=1)
                a = pending.pop(ready[0])
                done += sum(len(g.samples) for g in ray.get(ready[0]))
                pending[a.generate.remote(prompts)] = a
            ray.get(list(pending))
            rates[n].append(done / (time.perf_counter() - t0))
    base = statistics.median(rates[1])
    report("rollout_scaling", **{f"workers_{n}_samples_per_s": statistics.median(r) for n, r in rates.items()},
           **{f"ratio_{n}_to_1": statistics.median(r) / base for n, r in rates.items()}, cpus=os.cpu_count())
    for a in actors:
        ray.kill(a)


def bench_broadcast():
    import ray

    from bench_spine import SMOL, TINY, SyncPeer

    Peer = ray.remote(SyncPeer).options(num_cpus=0.2)
    for label, config in (("tiny", TINY), ("135M", SMOL)):
        learner = Peer.remote(config)
        readers = [Peer.remote(config) for _ in range(4)]
        ray.get([learner.nbytes.remote()] + [r.nbytes.remote() for r in readers])
        times = {1: [], 4: []}
        for _ in range(3 if QUICK else 5):
            for n in (1, 4):
                t0 = time.perf_counter()
                payload, _ = ray.get(learner.publish.remote())
                ray.get([r.apply.remote(payload) for r in readers[:n]])
                times[n].append(time.perf_counter() - t0)
                del payload
        t1, t4 = statistics.median(times[1]), statistics.median(times[4])
        report(f"broadcast_{label}", one_worker_s=t1, four_workers_s=t4, ratio_4_to_1=t4 / t1)
        for a in [learner, *readers]:
            ray.kill(a)


def main():
    import ray

    from actors.models.tiny import prepare_builtin_policy

    ray.init(address="local", num_cpus=4, _node_ip_address="127.0.0.2", include_dashboard=False, object_store_memory=2_000_000_000,
             log_to_driver=False)
    policy = str(prepare_builtin_policy()[0])
    bench_rollout_scaling(policy)
    bench_broadcast()
    print(json.dumps(RESULTS, indent=2))
    ray.shutdown()


if __name__ == "__main__":
    main()
