"""Environments and tools, measured: the sandbox's start-up, a remote environment vs the same
environment in process, and episodes through a rollout worker.

    python tests/bench/bench_envs.py [--rounds 3] [--calls 40]
    FLEETRL_CACHE=DIR python tests/bench/bench_envs.py --smollm2 [--workers 2] [--engine vllm]

1. ``python`` tool: ms per call of ``print(1)`` in a fresh bubblewrap sandbox, in one the
   ``SandboxPool`` started ahead of the call (what the tool uses), against ``python -I -c``
   without the sandbox and against ``exec`` in this process.
2. A remote environment (``fleetrl env serve``'s server, in this process's gRPC stack on
   loopback) vs the same environment in process: step calls/s of a non-trivial step
   (the ``calculator`` tool on a 40-term expression plus 2 ms of work), and episodes/s
   through a real ``RolloutWorker`` (tiny chat policy, HF engine, 3-turn episodes of
   ``tests.envs:Echo``, with a trivial step and with 5 ms of work per step): the ratio the
   issue asks to keep >= 0.8 on a non-trivial step.

3. ``--smollm2``: turns/s and tool calls/s of the built-in tool task (``multiply``, SmolLM2-135M,
   the calculator) with ``--workers`` rollout actors generating at once (16 prompts x 4 episodes
   each, temperature 1), the policy untrained.

Every pair is alternated round by round (this machine is noisy); medians.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def arg(name: str, default: str) -> str:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def per_call_ms(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e3


class Busy:
    """A non-trivial step: the calculator on a long expression, and 2 ms of work."""

    stop = ()

    def __init__(self):
        from actors.envs.tools import ToolEnvironment

        self.tools = ToolEnvironment(["calculator"])
        self.expr = " + ".join(f"{i} * {i + 1}" for i in range(40))

    def reset(self, prompt, metadata):
        return self.tools.reset(prompt, metadata)

    def step(self, state, completion):
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.002:
            pass
        return self.tools.step(state, f"<calculator>{self.expr}</calculator>")

    def finish(self, state):
        return self.tools.finish(state)


def main() -> None:
    from actors.envs.config import make_env
    from actors.envs.sandbox import SandboxLimits, SandboxPool, run_python, sandbox_unavailable
    from actors.envs.server import start_env_server
    from actors.serving import ServerConfig
    from tests.test_envs import build_chat_char_policy

    rounds, calls = int(arg("--rounds", "3")), int(arg("--calls", "40"))
    print(f"# python tool start-up, {calls} calls per round, {rounds} rounds")
    why = sandbox_unavailable()
    if why:
        print(f"sandbox: cannot run here ({why})")
    else:
        limits = SandboxLimits()
        pool = SandboxPool(limits)
        rows = {"sandbox": [], "pooled sandbox (10 ms apart)": [], "python -I": [], "exec": []}

        def pooled():  # calls apart, as tool calls come between generation: the pool refills meanwhile
            time.sleep(0.01)
            t0 = time.perf_counter()
            pool.run("print(1)")
            return time.perf_counter() - t0

        for _ in range(rounds):
            rows["sandbox"].append(per_call_ms(lambda: run_python("print(1)", limits), calls))
            rows["pooled sandbox (10 ms apart)"].append(statistics.median(pooled() for _ in range(calls)) * 1e3)
            rows["python -I"].append(per_call_ms(lambda: subprocess.run(["/usr/bin/python3", "-I", "-c", "print(1)"],
                                                                        capture_output=True), calls))
            rows["exec"].append(per_call_ms(lambda: exec("x = 1", {}), calls))
        for k, v in rows.items():
            print(f"  {k}: {statistics.median(v):.2f} ms per call")

    print("# remote environment vs in process")
    busy = Busy()
    server = start_env_server(busy, ServerConfig(port=0), name="busy")
    try:
        remote = make_env(f"grpc://{server.address}")
        local_rates, remote_rates = [], []
        for _ in range(rounds):
            for env, rates in ((busy, local_rates), (remote, remote_rates)):
                state = env.reset("p", {})
                t0 = time.perf_counter()
                for _ in range(calls):
                    env.step(state, "x")
                rates.append(calls / (time.perf_counter() - t0))
        lo, re = statistics.median(local_rates), statistics.median(remote_rates)
        print(f"  step calls/s (non-trivial step): in process {lo:.0f}, remote {re:.0f}: ratio {re / lo:.3f}")
    finally:
        server.stop(0, lame_duck_s=0)

    policy = build_chat_char_policy(Path(tempfile.mkdtemp()) / "policy")
    for work_ms in (0.0, 5.0):
        worker_ratio(policy, work_ms, rounds)


def worker_ratio(policy: str, work_ms: float, rounds: int) -> None:
    from actors.envs.config import EnvConfig
    from actors.envs.server import start_env_server
    from actors.rollout.worker import RolloutConfig, RolloutWorker
    from actors.serving import ServerConfig
    from actors.types import Prompt
    from tests.envs import Echo
    from tests.test_envs import chat_prompt

    args = {"turns": 3, "work_ms": work_ms}
    echo_server = start_env_server(Echo(**args), ServerConfig(port=0), name="echo")
    try:
        cfg = RolloutConfig(group_size=8, max_new_tokens=16, temperature=1.0, num_threads=1)
        workers = {"in process": RolloutWorker(policy, cfg, env=EnvConfig(name="tests.envs:Echo", args=args,
                                                                          max_turns=3)),
                   "remote": RolloutWorker(policy, cfg, env=EnvConfig(name=f"grpc://{echo_server.address}",
                                                                      max_turns=3))}
        prompts = [chat_prompt(workers["remote"].tokenizer, f"question {i}") for i in range(8)]
        prompts = [Prompt(uid=i, text=p.text, metadata={}) for i, p in enumerate(prompts)]
        rates = {k: [] for k in workers}
        turns = {k: 0 for k in workers}
        for _ in range(rounds):
            for name, w in workers.items():
                t0 = time.perf_counter()
                groups = w.generate(prompts)
                rates[name].append(sum(len(g.samples) for g in groups) / (time.perf_counter() - t0))
                turns[name] = sum(s.turns for g in groups for s in g.samples)
        med = {k: statistics.median(v) for k, v in rates.items()}
        print(f"  episodes/s through a RolloutWorker (8 prompts x 8 episodes x 3 turns, HF engine, tiny policy, "
              f"{work_ms:g} ms of work per step): "
              f"in process {med['in process']:.1f}, remote {med['remote']:.1f}: ratio "
              f"{med['remote'] / med['in process']:.3f} (turns per round {turns})")
    finally:
        echo_server.stop(0, lame_duck_s=0)


def smollm2_tool_task(workers: int, engine: str) -> None:
    """Turns/s and tool calls/s of the multiply task with ``workers`` rollout actors at once."""
    import ray

    from actors.envs.config import EnvConfig
    from actors.rollout.engines.vllm import VLLMConfig
    from actors.rollout.worker import RolloutConfig
    from actors.runtime.rollout_actor import create_rollout_actor
    from actors.tasks.registry import make_task
    from actors.types import Prompt
    from learner.cli import init_ray
    from tests.bench.smollm2_run import model_dir

    path = str(model_dir())
    init_ray(None)
    task = make_task("multiply", operand_digits=[3, 3], chat_template=True, tokenizer_path=path)
    cfg = RolloutConfig(engine=engine, group_size=4, temperature=1.0, max_new_tokens=task.max_new_tokens,
                        num_threads=1, num_cpus=0.5, vllm=VLLMConfig(kv_cache_gib=1.0, max_model_len=512))
    env = EnvConfig(name="calculator", max_turns=3)
    actors = [create_rollout_actor(path, cfg, name=f"r{i}", seed=i, default_max_new_tokens=task.max_new_tokens, env=env)
              for i in range(workers)]
    ray.get([a.where.remote() for a in actors])
    examples = task.eval_set(16 * workers * 2)
    prompts = [Prompt(uid=i, text=e.prompt, metadata={"answer": e.answer}) for i, e in enumerate(examples)]
    ray.get([a.generate.remote(prompts[:2]) for a in actors])  # warm-up
    t0 = time.perf_counter()
    groups = [g for part in ray.get([a.generate.remote(prompts[16 * i:16 * (i + 1)]) for i, a in enumerate(actors)])
              for g in part]
    seconds = time.perf_counter() - t0
    samples = [s for g in groups for s in g.samples]
    turns = sum(s.turns for s in samples)
    calls = sum(int(s.metadata.get("tool_calls", 0)) for s in samples)
    print(f"# multiply on SmolLM2-135M ({engine}), {workers} rollout workers, {len(samples)} episodes in {seconds:.1f} s: "
          f"{turns / seconds:.2f} turns/s, {calls / seconds:.2f} tool calls/s, {len(samples) / seconds:.2f} episodes/s "
          f"({turns / len(samples):.2f} turns and {calls / len(samples):.2f} tool calls per episode)")


if __name__ == "__main__":
    if "--smollm2" in sys.argv:
        smollm2_tool_task(int(arg("--workers", "2")), arg("--engine", "vllm"))
    else:
        main()
