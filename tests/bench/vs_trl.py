"""fleetrl vs TRL's GRPOTrainer, side by side in one invocation.

    python tests/bench/vs_trl.py [--quick] [--reps N] [--configs 2x4:15,8x8:40] [--no-trl-passive] [--json-out F]

Needs the ``bench`` extra (``pip install torch==2.13.0 -e ".[test,bench]"``).

What is the same in both frameworks
-----------------------------------
- the policy: the built-in warm-started tiny Llama folder
  (``actors.models.tiny.prepare_builtin_policy()``), loaded in float32 by both;
- the task and prompts: reverse a 4-digit string, prompts taken in the same order
  from ``ReverseDigits.prompt_stream()`` (TRL: a ``datasets.Dataset`` of the first
  prompts of that stream with ``shuffle_dataset=False``; fleetrl: its coordinator
  hands them out in the same order, so each step trains on the same prompt ids
  as far as the asynchronous hand-out allows);
- the reward: the very same function, ``actors.tasks.base.exact_match_reward``
  (TRL passes the dataset column ``answer`` as a keyword, fleetrl the prompt's
  metadata);
- per step: P prompts x G samples (TRL ``per_device_train_batch_size = P * G``,
  ``num_generations = G``; fleetrl ``train.prompts_per_step = P``,
  ``rollout.group_size = G``); completion cap 5 tokens (4 digits + EOS:
  ``max_completion_length`` / the task's default ``max_new_tokens``);
  temperature 1.0, top-p 1, no top-k;
- the optimisation: AdamW lr 5e-4, betas (0.9, 0.99), eps 1e-8, no weight decay,
  constant schedule, no warm-up, gradient-norm clip 1.0, no KL (beta 0), one
  optimizer step per batch (TRL ``num_iterations=1``, no gradient accumulation);
- the loss: GRPO advantages (group mean, divided by the group's unbiased std:
  TRL ``scale_rewards="group"``, fleetrl ``learner.advantage=grpo``), PPO-clip
  with bounds 0.2 / 0.28 (TRL ``epsilon``/``epsilon_high``, fleetrl
  ``clip_low``/``clip_high``), per-token losses summed and divided by the number
  of completion tokens in the batch (TRL ``loss_type="dapo"``, fleetrl
  ``learner.loss_agg=token-mean``; fleetrl's default is seq-mean-token-sum);
- 2 CPU threads in all: TRL in one process with ``torch.set_num_threads(2)``
  (``use_cpu=True, bf16=False``); fleetrl in its default layout (2 rollout workers
  x 1 thread, learner 1 thread, 1 reward worker) with ``reward.colocate: true``
  (the rollout workers score with the rule reward themselves) on a local Ray instance with
  ``num_cpus=2``.

What differs (and cannot or should not be made equal)
-----------------------------------------------------
- TRL's advantage divides by ``std + 1e-4``, fleetrl's by ``std + 1e-6``.
- TRL computes the importance ratio against ``per_token_logps.detach()`` (exactly
  1 on-policy); fleetrl against the behaviour log-probs recorded by
  ``generate`` (1 up to float rounding when on-policy; the correction for the
  one-version-stale samples of the async mode).
- fleetrl skips the forward/backward of samples with zero advantage (all-equal
  groups); the gradient is the same. TRL runs every sample and also computes
  per-token entropies for logging.
- fleetrl async (``max_staleness=1``) trains on samples up to one version old;
  TRL and fleetrl sync are on-policy.
- Sampling RNG streams differ (TRL one process, fleetrl seeded per worker call),
  so the completions and hence the reward curves differ run to run.
- TRL runs with ``gradient_checkpointing=False`` (GRPOConfig's default is True,
  which only costs time here), no checkpoint saving, ``logging_steps=10``, no
  evaluation during training.
- TRL runs in its own subprocess (its import does not count); the idle Ray
  daemons of the fleetrl side stay up meanwhile. TRL is run twice per round, with
  the OpenMP default wait policy and with ``OMP_WAIT_POLICY=PASSIVE`` (this
  machine is shared: spinning OpenMP threads suffer badly under outside load),
  and the ratios use the faster of the two ("TRL best").
- Start-up is not in the throughput: fleetrl's actor start (Ray processes each
  importing torch + transformers and loading the policy) and TRL's trainer
  construction are reported separately. The clock starts right before the first
  step (fleetrl: where ``Trainer.train`` starts its RL clock; TRL: ``on_train_begin``).

What is measured
----------------
Every run trains for a fixed wall time. Throughput counts trained samples:
steady samples/s = P*G*(n-5) / (t_n - t_5) over step-end times (the first 5
steps, pipeline fill and warm-up, left out), median s/step over the same steps,
and whole-run samples/s (all trained samples / run time). Ratios are
median(fleetrl) / median(TRL best) over the rounds. Reward vs wall clock: the
mean training reward over the last ``512 / (P*G)`` steps at fixed time points,
and held-out greedy accuracy (200 prompts the RL stream never contains) of
weight snapshots taken at those time points (a snapshot costs a few ms; it is
evaluated after the run, outside the clock). "Reaches TRL's final" = the first
time a fleetrl run's windowed reward (or snapshot accuracy) is >= that of the
TRL run of the same round at its end. CPU ms/step: user + system CPU time of
every process of the run (TRL: its process; fleetrl: driver, actors and the Ray
daemons) over the run, divided by its steps -- the work a step costs, which
outside load distorts less than wall time (``vs_trl_profile.py`` breaks it down
and can attach py-spy to every fleetrl process).

Measured here (2 vCPU, shared: load average 3-25 from other work during the
runs), two full runs of 2 rounds each, samples/s fleetrl / TRL passive:
2x4 sync 0.81 and 0.74, async 1.01 and 1.06; 8x8 sync 1.09 and 0.99, async 1.47
and 1.38 (goal 1.5). TRL with OpenMP's default wait policy was 6-20x slower
than with PASSIVE under that load. 8x8 held-out accuracy after 40 s (start
0.295): TRL 0.18 / 0.24, fleetrl sync 0.34 / 0.34, async 0.58 / 0.53; async
reached TRL's final held-out accuracy after 13-20 s, sync after 20-33 s. At 2x4
(8 samples per step, lr 5e-4) every runner loses accuracy. Where fleetrl's
time goes: see the phase and per-process CPU lines of each run.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: the sibling procs.py
from procs import cpu_by_process, cpu_delta  # noqa: E402

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

QUICK = "--quick" in sys.argv
ROOT = Path(__file__).resolve().parents[2]
LR, BETAS, CLIP_LOW, CLIP_HIGH, MAX_NEW = 5e-4, (0.9, 0.99), 0.2, 0.28, 5
SKIP = 5  # steps left out of steady-state throughput (pipeline fill, warm-up)
THREADS = 2
EVAL_SIZE = 200
RUNNERS = ("trl", "sync", "async", "trl_passive")


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def arg(name: str, default: str) -> str:
    for i, a in enumerate(sys.argv):
        if a == name and i + 1 < len(sys.argv):
            return sys.argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return default


def warm_policy() -> str:
    from actors.models.tiny import prepare_builtin_policy

    return str(prepare_builtin_policy()[0])


def snapshot_points(seconds: float) -> list[float]:
    n = 3 if QUICK else 6
    return [seconds * (i + 1) / n for i in range(n)]


# ------------------------------------------------------------------------------------------------
# TRL: one run in a subprocess (python vs_trl.py --trl-worker SPEC_JSON)
# ------------------------------------------------------------------------------------------------
def trl_worker(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    t_import = time.perf_counter()
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig, GRPOTrainer

    from actors.reward.functions import exact_match_reward
    from actors.tasks.registry import make_task

    hf_logging.set_verbosity_error()
    import_s = time.perf_counter() - t_import
    t_setup = time.perf_counter()
    P, G, seconds = spec["prompts"], spec["group"], spec["seconds"]
    stream = make_task("reverse").prompt_stream()
    # enough prompts for any run length (one epoch is never finished)
    rows = [{"prompt": p.text, "answer": p.metadata["answer"]} for p, _ in zip(stream, range(spec["max_prompts"]))]
    dataset = Dataset.from_list(rows)
    tok = AutoTokenizer.from_pretrained(spec["policy"])
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32)
    args = GRPOConfig(
        output_dir=spec["out_dir"], use_cpu=True, bf16=False, report_to="none", seed=0,
        per_device_train_batch_size=P * G, num_generations=G, gradient_accumulation_steps=1, num_iterations=1,
        max_completion_length=MAX_NEW, temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=1e-8, weight_decay=0.0,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0,
        beta=0.0, loss_type="dapo", scale_rewards="group", epsilon=CLIP_LOW, epsilon_high=CLIP_HIGH,
        shuffle_dataset=False, gradient_checkpointing=False, save_strategy="no", logging_steps=10,
        max_steps=spec["max_prompts"] // P, disable_tqdm=True, dataloader_num_workers=0,
    )
    rewards: list[float] = []

    def reward(prompts, completions, **kw):  # the same function fleetrl's rollout workers call
        r = exact_match_reward(prompts, completions, **kw)
        rewards.append(sum(r) / len(r))
        return r

    reward.__name__ = "exact_match"
    ends: list[float] = []
    snaps: list[tuple[float, dict]] = []
    points = list(spec["points"])
    clock = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            clock["t0"] = time.perf_counter()
            clock["cpu0"] = sum(os.times()[:2])  # user + system of all threads of this process

        def on_step_end(self, a, state, control, model=None, **kw):
            t = time.perf_counter() - clock["t0"]
            ends.append(t)
            if points and t >= points[0]:
                w = {k: v.detach().clone() for k, v in model.state_dict().items()}
                while points and t >= points[0]:  # one entry per time point passed
                    points.pop(0)
                    snaps.append((t, w))
            if t >= seconds:
                control.should_training_stop = True

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset, processing_class=tok,
                          callbacks=[Clock()])
    setup_s = time.perf_counter() - t_setup
    trainer.train()
    wall = time.perf_counter() - clock["t0"]
    cpu = sum(os.times()[:2]) - clock["cpu0"]
    final = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    torch.save({"snaps": snaps, "final": (ends[-1], final)}, spec["snap_file"])
    Path(spec["result_file"]).write_text(json.dumps(
        {"ends": ends, "rewards": rewards, "setup_s": setup_s, "import_s": import_s, "wall_s": wall,
         "cpu_s": {"trl": cpu},
         "torch_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default")}))


def run_trl(policy: str, P: int, G: int, seconds: float, tmp: Path, tag: str, passive: bool) -> dict:
    import torch

    spec = dict(policy=policy, prompts=P, group=G, seconds=seconds, threads=THREADS, points=snapshot_points(seconds),
                max_prompts=max(4096, int(seconds * 400)), out_dir=str(tmp / f"trl-out-{tag}"),
                snap_file=str(tmp / f"trl-snaps-{tag}.pt"), result_file=str(tmp / f"trl-{tag}.json"))
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    env.pop("OMP_WAIT_POLICY", None)
    if passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    t0 = time.perf_counter()
    log = tmp / f"trl-{tag}.log"
    with log.open("w") as f:
        rc = subprocess.run([sys.executable, __file__, "--trl-worker", json.dumps(spec)], env=env, stdout=f,
                            stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if rc != 0:
        raise RuntimeError(f"TRL run failed (rc {rc}); last lines of {log}:\n" + "".join(log.read_text()[-3000:]))
    res = json.loads(Path(spec["result_file"]).read_text())
    snaps = torch.load(spec["snap_file"], weights_only=True)
    n = min(len(res["ends"]), len(res["rewards"]))
    return {"ends": res["ends"][:n], "rewards": res["rewards"][:n], "setup_s": res["setup_s"],
            "process_s": time.perf_counter() - t0, "snaps": snaps["snaps"], "final": snaps["final"],
            "kind": "state_dict", "omp_wait_policy": res["omp_wait_policy"], "cpu_s": res["cpu_s"]}


# ------------------------------------------------------------------------------------------------
# fleetrl: the real Trainer, in this process, with weight snapshots at fixed times
# ------------------------------------------------------------------------------------------------
def run_fleetrl(policy: str, P: int, G: int, seconds: float, staleness: int, tmp: Path, tag: str,
                on_start=None, extra: tuple[str, ...] = ()) -> dict:
    """``on_start(trainer)`` is called once the rollout loops run (vs_trl_profile.py attaches py-spy there);
    ``extra``: more config overrides (experiments only; the benchmark runs the default layout)."""
    import numpy as np
    import ray

    from learner.config import load_config
    from learner.driver.trainer import Trainer

    class SnapshotTrainer(Trainer):
        """Records the RL clock start and the learner's published weights at fixed times."""

        points: list[float] = []
        snaps: list = []
        t0 = None

        def start_rollouts(self):
            self.t0 = time.perf_counter()  # right after Trainer.train() starts its RL clock
            self.cpu0 = cpu_by_process()
            super().start_rollouts()
            if on_start is not None:
                on_start(self)

        def stop_rollouts(self, timeout_s: float = 60.0) -> dict:
            self.cpu_s = cpu_delta(self.cpu0, cpu_by_process())  # the training loop is over
            return super().stop_rollouts(timeout_s)

        def complete(self, queued):
            m, version = super().complete(queued)
            if self.t0 is not None and self.points and time.perf_counter() - self.t0 >= self.points[0]:
                t = time.perf_counter() - self.t0
                payload = ray.get(self.coordinator.latest_weights.remote())
                arrays = ray.get(list(payload.refs.values()))
                w = {k: np.array(a) for k, a in zip(payload.refs, arrays)}
                while self.points and t >= self.points[0]:  # one entry per time point passed
                    self.points.pop(0)
                    self.snaps.append((t, w))
            return m, version

    cfg = load_config(None, [
        "--model.path", policy, "--train.steps", "10000000", "--train.max_wall_s", str(seconds),
        "--train.prompts_per_step", str(P), "--rollout.group_size", str(G), "--train.max_staleness", str(staleness),
        "--learner.lr", str(LR), "--learner.betas", json.dumps(list(BETAS)), "--learner.loss_agg", "token-mean",
        "--learner.advantage", "grpo", "--learner.clip_low", str(CLIP_LOW), "--learner.clip_high", str(CLIP_HIGH),
        "--learner.max_grad_norm", "1.0", "--rollout.temperature", "1.0", "--rollout.max_new_tokens", str(MAX_NEW),
        "--task.eval_size", "8", "--reward.colocate", "true", *extra])
    t = SnapshotTrainer(cfg, tmp / f"fleetrl-{tag}", out=io.StringIO(), progress=False)
    t.points, t.snaps = snapshot_points(seconds), []
    t_start = time.perf_counter()
    try:
        s = t.train()
    finally:
        t.shutdown()
    rows = t.history
    assert all(r["samples"] == P * G for r in rows), "a step trained fewer samples than P x G"
    phases = {k: med([r[k] for r in rows[SKIP:]] or [r[k] for r in rows])
              for k in ("sample_s", "update_sync_s", "update_s", "active_samples")}
    return {"ends": [r["time_s"] for r in rows], "rewards": [r["reward_mean"] for r in rows], "phases": phases,
            "setup_s": s["setup_s"], "process_s": time.perf_counter() - t_start, "snaps": t.snaps,
            "final": (rows[-1]["time_s"], s["policy_dir"]), "kind": "flat", "cpu_s": t.cpu_s,
            "dropped": s["dropped"], "staleness_mean": statistics.mean(r["staleness_mean"] for r in rows)}


# ------------------------------------------------------------------------------------------------
# evaluation of snapshots (after the run, outside the clock)
# ------------------------------------------------------------------------------------------------
class Evaluator:
    def __init__(self, policy: str):
        import torch

        from actors.rollout.policy import load_policy
        from actors.tasks.registry import make_task
        from actors.weights.flat import FlatParams

        torch.set_num_threads(THREADS)
        self.policy = policy
        self.examples = make_task("reverse").eval_set(EVAL_SIZE)
        self.model, self.tok = load_policy(policy, device=torch.device("cpu"), dtype="float32")
        self.initial = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.flat_model, _ = load_policy(policy, device=torch.device("cpu"), dtype="float32")
        self.flat = FlatParams(self.flat_model)

    def accuracy(self, kind: str, weights) -> float:
        import torch
        from transformers import AutoModelForCausalLM

        from actors.tasks.evaluate import greedy_accuracy

        if kind == "state_dict":
            self.model.load_state_dict(weights)
            model = self.model
        elif kind == "flat":
            with torch.no_grad():
                for name, arr in weights.items():
                    self.flat.buffers[name].copy_(torch.from_numpy(arr))
            model = self.flat_model
        else:  # a saved policy folder
            model = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32)
        return greedy_accuracy(model, self.tok, self.examples, max_new_tokens=MAX_NEW)

    def curve(self, run: dict) -> list[tuple[float, float]]:
        done: dict[int, float] = {}
        out = []
        for t, w in run["snaps"]:
            if id(w) not in done:
                done[id(w)] = self.accuracy(run["kind"], w)
            out.append((t, done[id(w)]))
        t_final, w_final = run["final"]
        out.append((t_final, self.accuracy(run["kind"] if run["kind"] == "state_dict" else "folder", w_final)))
        run["snaps"] = run["final"] = None  # free the weights
        return out


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------
def throughput(run: dict, samples_per_step: int) -> dict:
    ends = run["ends"]
    n = len(ends)
    steady = ends[SKIP:] if n > SKIP + 1 else ends
    diffs = [b - a for a, b in zip(steady, steady[1:])]
    span = steady[-1] - steady[0]
    return {"steps": n, "sps": samples_per_step * (len(steady) - 1) / span if span > 0 else None,
            "s_per_step_median": med(diffs), "s_per_step_mean": span / (len(steady) - 1) if len(steady) > 1 else None,
            "sps_whole": samples_per_step * n / ends[-1]}


def windowed(run: dict, window: int) -> list[tuple[float, float]]:
    """(time, mean reward of the last ``window`` steps) at every step with a full window."""
    r, e = run["rewards"], run["ends"]
    return [(e[i], sum(r[i - window + 1 : i + 1]) / window) for i in range(window - 1, len(r))]


def value_at(curve: list[tuple[float, float]], t: float):
    v = None
    for ti, vi in curve:
        if ti <= t + 1e-9:
            v = vi
    return v


def first_reach(curve: list[tuple[float, float]], target) -> float | None:
    if target is None:
        return None
    return next((t for t, v in curve if v >= target - 1e-12), None)


def fmt(v, spec=".3f"):
    if v is None:
        width = spec.split(".")[0]
        return "-".rjust(int(width) if width.isdigit() else 0)
    return format(v, spec)


# ------------------------------------------------------------------------------------------------
def bench_config(policy: str, evaluator: Evaluator, P: int, G: int, seconds: float, reps: int, runners, tmp: Path,
                 start_acc: float):
    label = f"{P}x{G}"
    window = max(1, round(512 / (P * G)))
    res = {k: [] for k in runners}
    for rep in range(reps):
        for k in runners:
            tag = f"{label}-{k}-{rep}"
            load_before = os.getloadavg()[0]
            if k.startswith("trl"):
                run = run_trl(policy, P, G, seconds, tmp, tag, passive=k == "trl_passive")
            else:
                run = run_fleetrl(policy, P, G, seconds, {"sync": 0, "async": 1}[k], tmp, tag)
            run["load"] = (load_before, os.getloadavg()[0])
            run["tp"] = throughput(run, P * G)
            run["acc"] = evaluator.curve(run)
            run["win"] = windowed(run, window)
            res[k].append(run)
            tp = run["tp"]
            print(f"  {label} {k:11s} round {rep}: {tp['steps']:5d} steps in {run['ends'][-1]:.1f}s, "
                  f"{fmt(tp['sps'], '.0f')} samples/s steady ({fmt(tp['s_per_step_median'], '.4f')} s/step median), "
                  f"{tp['sps_whole']:.0f} whole run; reward {fmt(run['win'][0][1] if run['win'] else None, '.3f')} -> "
                  f"{fmt(run['win'][-1][1] if run['win'] else None, '.3f')}; held-out {run['acc'][-1][1]:.3f}; "
                  f"start-up {run['setup_s']:.1f}s; load avg {run['load'][0]:.1f}/{run['load'][1]:.1f}", flush=True)
            cpu = run["cpu_s"]
            print(f"      CPU per step, all processes: {1e3 * sum(cpu.values()) / tp['steps']:.1f} ms"
                  + ("" if len(cpu) == 1 else " (" + ", ".join(
                      f"{k} {1e3 * v / tp['steps']:.1f}" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])) + ")"),
                  flush=True)
            if "phases" in run:
                ph = run["phases"]
                print(f"      fleetrl phases (median per step): sample {ph['sample_s'] * 1e3:.1f} ms, update + "
                      f"sync weights {ph['update_sync_s'] * 1e3:.1f} ms ({ph['update_s'] * 1e3:.1f} ms inside the "
                      f"learner's update, {ph['active_samples']:.0f} of {P * G} samples with nonzero advantage)",
                      flush=True)

    trl_kinds = [k for k in runners if k.startswith("trl")]
    summary: dict = {"prompts": P, "group": G, "samples_per_step": P * G, "seconds": seconds, "rounds": reps,
                     "reward_window_steps": window}
    for k in runners:
        summary[k] = {
            "samples_per_s": med([r["tp"]["sps"] for r in res[k]]),
            "s_per_step_median": med([r["tp"]["s_per_step_median"] for r in res[k]]),
            "s_per_step_mean": med([r["tp"]["s_per_step_mean"] for r in res[k]]),
            "samples_per_s_whole_run": med([r["tp"]["sps_whole"] for r in res[k]]),
            "steps": med([r["tp"]["steps"] for r in res[k]]),
            "startup_s": med([r["setup_s"] for r in res[k]]),
            "final_reward": med([r["win"][-1][1] for r in res[k] if r["win"]]),
            "final_heldout": med([r["acc"][-1][1] for r in res[k]]),
            "load_avg": [r["load"] for r in res[k]],
            "cpu_ms_per_step": med([1e3 * sum(r["cpu_s"].values()) / r["tp"]["steps"] for r in res[k]]),
            "cpu_ms_per_step_by_process": {p: med([1e3 * r["cpu_s"].get(p, 0.0) / r["tp"]["steps"] for r in res[k]])
                                           for p in res[k][0]["cpu_s"]},
        }
        if k in ("sync", "async"):
            summary[k]["phases_ms"] = {p: 1e3 * med([r["phases"][p] for r in res[k]]) if p.endswith("_s") else
                                       med([r["phases"][p] for r in res[k]]) for p in res[k][0]["phases"]}
    best = max(trl_kinds, key=lambda k: summary[k]["samples_per_s"] or 0)
    summary["trl_best"] = best
    tb = summary[best]
    for k in ("sync", "async"):
        if k in runners:
            s = summary[k]
            s["sps_over_trl"] = s["samples_per_s"] / tb["samples_per_s"] if tb["samples_per_s"] else None
            s["whole_run_sps_over_trl"] = s["samples_per_s_whole_run"] / tb["samples_per_s_whole_run"]
            s["s_per_step_trl_over_ours"] = tb["s_per_step_median"] / s["s_per_step_median"]
            # per round: when does this run reach the final reward / held-out accuracy of that round's TRL run
            reach_r, reach_a = [], []
            for rep in range(reps):
                trl = res[best][rep]
                target_r = trl["win"][-1][1] if trl["win"] else None
                target_a = trl["acc"][-1][1]
                reach_r.append((first_reach(res[k][rep]["win"], target_r), trl["ends"][-1], target_r))
                reach_a.append((first_reach(res[k][rep]["acc"], target_a), trl["ends"][-1], target_a))
            s["reach_trl_final_reward"] = reach_r
            s["reach_trl_final_heldout"] = reach_a

    # -- tables
    print(f"\n== {label}: {P} prompts x {G} samples per step, {seconds:.0f} s per run, {reps} round(s); "
          f"medians over rounds ==")
    print(f"{'runner':14s} {'samples/s':>10s} {'s/step med':>11s} {'s/step mean':>12s} {'whole-run sps':>14s} "
          f"{'steps':>6s} {'start-up s':>11s} {'CPU ms/step':>12s} {'ratio sps':>10s}")
    for k in runners:
        s = summary[k]
        ratio = s.get("sps_over_trl") if k in ("sync", "async") else (
            s["samples_per_s"] / tb["samples_per_s"] if s["samples_per_s"] and tb["samples_per_s"] else None)
        name = {"trl": "TRL", "trl_passive": "TRL (passive)", "sync": "fleetrl sync", "async": "fleetrl async"}[k]
        print(f"{name:14s} {fmt(s['samples_per_s'], '10.0f')} {fmt(s['s_per_step_median'], '11.4f')} "
              f"{fmt(s['s_per_step_mean'], '12.4f')} {fmt(s['samples_per_s_whole_run'], '14.0f')} "
              f"{fmt(s['steps'], '6.0f')} {fmt(s['startup_s'], '11.1f')} {fmt(s['cpu_ms_per_step'], '12.1f')} "
              f"{fmt(ratio, '10.2f')}")
    print(f"(ratio = samples/s / TRL best = {best})")

    points = snapshot_points(seconds)
    cols = [k for k in runners]
    names = {"trl": "TRL", "trl_passive": "TRL-p", "sync": "sync", "async": "async"}
    print(f"\nreward vs wall clock ({label}; mean over rounds): training reward = mean over the last {window} steps; "
          f"held-out = greedy accuracy, {EVAL_SIZE} prompts (start {start_acc:.3f})")
    print(f"{'t (s)':>6s} | " + " ".join(f"{'rew ' + names[k]:>10s}" for k in cols) + " | "
          + " ".join(f"{'acc ' + names[k]:>10s}" for k in cols))
    table = []
    for i, p in enumerate(points):
        rew = {k: _mean([value_at(r["win"], p) for r in res[k]]) for k in cols}
        acc = {k: _mean([r["acc"][i][1] if i < len(r["acc"]) - 1 else None for r in res[k]]) for k in cols}
        table.append({"t": p, "reward": rew, "heldout": acc})
        print(f"{p:6.1f} | " + " ".join(f"{fmt(rew[k], '10.3f')}" for k in cols) + " | "
              + " ".join(f"{fmt(acc[k], '10.3f')}" for k in cols))
    fin_r = {k: _mean([r["win"][-1][1] if r["win"] else None for r in res[k]]) for k in cols}
    fin_a = {k: _mean([r["acc"][-1][1] for r in res[k]]) for k in cols}
    print(f"{'end':>6s} | " + " ".join(f"{fmt(fin_r[k], '10.3f')}" for k in cols) + " | "
          + " ".join(f"{fmt(fin_a[k], '10.3f')}" for k in cols))
    summary["reward_vs_time"] = table
    for k in ("sync", "async"):
        if k not in runners:
            continue
        for what, key in (("training reward", "reach_trl_final_reward"), ("held-out accuracy", "reach_trl_final_heldout")):
            parts = [f"round {i}: {fmt(t, '.1f')} s (TRL {target if target is None else round(target, 3)} at "
                     f"{end:.1f} s)" for i, (t, end, target) in enumerate(summary[k][key])]
            print(f"fleetrl {k} reaches TRL's final {what}: " + "; ".join(parts))
    return summary


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def main():
    import ray

    if "--trl-worker" in sys.argv:
        trl_worker(json.loads(arg("--trl-worker", "{}")))
        return
    default_cfg = "2x4:6,8x8:8" if QUICK else "2x4:15,8x8:40"
    configs = []
    for item in arg("--configs", default_cfg).split(","):
        shape, secs = item.split(":")
        p, g = shape.lower().split("x")
        configs.append((int(p), int(g), float(secs)))
    reps = int(arg("--reps", "1" if QUICK else "2"))
    runners = [k for k in RUNNERS if not (k == "trl_passive" and "--no-trl-passive" in sys.argv)]
    tmp = Path(tempfile.mkdtemp(prefix="fleetrl-vs-trl-"))
    policy = warm_policy()
    ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.2", include_dashboard=False,
             object_store_memory=500_000_000, log_to_driver=False)
    evaluator = Evaluator(policy)
    start_acc = evaluator.accuracy("state_dict", evaluator.initial)
    print(f"policy {policy}; held-out greedy accuracy at the start {start_acc:.3f}; runs alternate "
          f"{' -> '.join(runners)}; {reps} round(s) per config", flush=True)
    t0 = time.perf_counter()
    out = {"heldout_start": start_acc, "configs": {}}
    for P, G, secs in configs:
        out["configs"][f"{P}x{G}"] = bench_config(policy, evaluator, P, G, secs, reps, runners, tmp, start_acc)
    out["total_s"] = round(time.perf_counter() - t0, 1)
    ray.shutdown()
    brief = {"heldout_start": start_acc, "total_s": out["total_s"]}
    for label, s in out["configs"].items():
        brief[label] = {
            "trl_best": s["trl_best"],
            **{f"{k}_samples_per_s": s[k]["samples_per_s"] for k in runners},
            **{f"{k}_s_per_step": s[k]["s_per_step_median"] for k in runners},
            **{f"{k}_cpu_ms_per_step": s[k]["cpu_ms_per_step"] for k in runners},
            **{f"{k}_over_trl": s[k].get("sps_over_trl") for k in ("sync", "async")},
            **{f"{k}_final_reward": s[k]["final_reward"] for k in runners},
            **{f"{k}_final_heldout": s[k]["final_heldout"] for k in runners},
            **{f"{k}_reach_trl_final_reward_s": [x[0] for x in s[k]["reach_trl_final_reward"]]
               for k in ("sync", "async")},
        }
    full = Path(arg("--json-out", str(tmp / "vs_trl.json")))
    full.write_text(json.dumps(out, indent=2, default=str))
    print(f"\nfull results: {full}")
    print(json.dumps(brief, default=str))


if __name__ == "__main__":
    main()
