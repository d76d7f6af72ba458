"""Chaos run: the default job with four components killed once each, at random times.

    python tests/bench/chaos.py [--seed S] [--out DIR]

The default training job (built-in policy, embedded defaults) with
``train.max_restarts 2`` and ``train.checkpoint_every 50``, plus a registered
reward model (a real ``fleetrl reward serve`` subprocess scoring the fraction
of digits, weight 0.1). A chaos thread ``kill -9``s, at seeded random times
after RL starts: a rollout worker, the reward worker, the registered reward
model's server, and the learner. Reported: whether the run finished and learned
(held-out gain), ``produced == trained + dropped`` over the whole run (restarts
included), and the time lost to each fault (``time_lost``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

import grpc  # noqa: E402
import ray  # noqa: E402

from learner.cli import init_ray  # noqa: E402
from learner.config import load_config  # noqa: E402
from learner.driver.run import run_training  # noqa: E402
from protos import control_pb2, control_pb2_grpc  # noqa: E402


def start_reward_server() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "learner.cli", "reward", "serve", "--function",
                             "tests.rewards:digit_reward", "--port", "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    for line in proc.stdout:
        if "listening on" in line:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, line.split("listening on")[1].split()[0].strip()
    raise RuntimeError("reward server did not start")


def pid_of(actor) -> int:
    return ray.get(actor.where.remote(), timeout=30)["pid"]


class Chaos:
    def __init__(self, seed: int, server: subprocess.Popen, endpoint: str):
        self.rng = random.Random(seed)
        self.server, self.endpoint = server, endpoint
        self.trainer = None
        self.kills: list[dict] = []
        self.t_rl = None

    def on_trainer(self, trainer) -> None:
        self.trainer = trainer

    def wait_training(self, min_step: int) -> None:
        while self.trainer is None or self.trainer.report is None or self.trainer.step < min_step:
            time.sleep(0.2)

    def kill(self, what: str, pid_fn) -> None:
        t = self.trainer
        step = t.step
        os.kill(pid_fn(t), signal.SIGKILL)
        self.kills.append({"what": what, "t": time.time(), "step": step})
        print(f"[chaos] kill -9 {what} at step {step}", flush=True)

    def run(self) -> None:
        self.wait_training(2)
        stub = control_pb2_grpc.ControlStub(grpc.insecure_channel(self.trainer.control.address))
        spec = control_pb2.RewardModelSpec(name="digits", endpoint=self.endpoint, weight=0.1, timeout_s=5.0)
        stub.RegisterRewardModel(control_pb2.RegisterRewardModelRequest(spec=spec), timeout=120)
        t0 = time.time()
        # one fault at a time: each window is longer than the recovery it may need (the model's pause
        # lasts reward.model_disable_after_s = 10 s), so the time lost to each is measured alone
        plan = [("rollout-worker", self.rng.uniform(5, 20)), ("reward-worker", self.rng.uniform(25, 40)),
                ("reward-model-server", self.rng.uniform(45, 55)), ("learner", self.rng.uniform(80, 95))]
        targets = {"rollout-worker": lambda t: pid_of(next(iter(t.rollouts.workers.values())).actor),
                   "reward-worker": lambda t: pid_of(next(iter(t.rewards.by_name.values()))),
                   "reward-model-server": lambda t: self.server.pid,
                   "learner": lambda t: pid_of(t.learner)}
        for what, at in plan:
            while time.time() - t0 < at:
                time.sleep(0.2)
            self.kill(what, targets[what])


AHEAD = 30
"""Time lost to a fault: how long the run took from the kill to step (step at kill + AHEAD),
minus AHEAD typical steps (a pause or a restart's redone steps fall inside the window)."""


def time_lost(rows: list[dict], kills: list[dict]) -> dict:
    rows = sorted(rows, key=lambda r: r["t"])
    dts = [b["t"] - a["t"] for a, b in zip(rows, rows[1:]) if b["step"] == a["step"] + 1]
    typical = statistics.median(dts) if dts else 0.0
    out = {}
    for k in kills:
        after = next((r for r in rows if r["t"] > k["t"] and r["step"] >= k["step"] + AHEAD), None)
        out[k["what"]] = round(after["t"] - k["t"] - AHEAD * typical, 2) if after else None
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=int(time.time()) % 10000)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    run_dir = Path(args.out or f"/tmp/fleetrl-chaos-{args.seed}")
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: restarts resume from its own checkpoints
    cfg = load_config(None, ["--train.max_restarts", "2", "--train.checkpoint_every", "50",
                             "--reward.model_disable_after_s", "10"])
    server, endpoint = start_reward_server()
    init_ray(None)
    chaos = Chaos(args.seed, server, endpoint)
    threading.Thread(target=chaos.run, daemon=True).start()
    t0 = time.time()
    out = io.StringIO()
    try:
        summary = run_training(cfg, run_dir, out=out, progress=False, on_trainer=chaos.on_trainer)
    finally:
        server.kill()
        ray.shutdown()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    result = {
        "seed": args.seed, "status": summary["status"], "steps": summary["steps"], "wall_s": round(time.time() - t0, 1),
        "eval_before": summary["eval_before"], "eval_after": summary["eval_after"],
        "gain": round(summary["eval_after"] - summary["eval_before"], 3),
        "produced": summary["produced"], "trained": summary["trained"], "dropped": summary["dropped"],
        "exact": summary["produced"] == summary["trained"] + summary["dropped"],
        "typical_step_s": round(statistics.median(
            [b["t"] - a["t"] for a, b in zip(rows, rows[1:]) if b["step"] == a["step"] + 1]), 4),
        "restarts": summary["restarts"], "rollout_replacements": summary["rollout_replacements"],
        "reward_replacements": summary["reward_replacements"],
        "events": [e["event"] for e in summary["events"]], "kills": [(k["what"], k["step"]) for k in chaos.kills],
        "time_lost_s": time_lost(rows, chaos.kills), "dropped_by_reason": summary["dropped_by_reason"],
    }
    print(out.getvalue()[-4000:])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
