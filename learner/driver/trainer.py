"""The training driver: builds the run's actors and runs sample -> update -> sync.

Rollout workers stream continuously (``actors.runtime.rollout_loop``); the
driver's loop is three visible phases per step:

1. **sample**: take ``train.prompts_per_step`` scored groups from the
   coordinator's buffer (groups staler than ``train.max_staleness`` are dropped
   there and counted);
2. **update**: one optimizer step on the learner (policy_version += 1);
3. **sync weights**: the new version reaches the rollout workers
   (``weight_sync.WeightSync``: object store or collective broadcast); the
   coordinator keeps the newest payload, which also opens the staleness gate
   for the next batch of prompts, and commits the step's groups as trained.

The loop of steps and its phases are ``steps.py`` (``StepLoop``, which also
queues step n + 1 before reading step n). Checkpoints are ``learner.checkpoint``; metrics rows, the summary and peak
memory are ``report.py``; the rollout fleet is ``fleet.py``; who watches the
actors is ``supervisor.py``; how a run ends early is ``ending.py``; restarts
are ``run.py``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import ray
import yaml

from actors.envs.config import EnvConfig
from actors.reward.functions import load_reward_fn
from actors.rollout.policy import policy_numel
from actors.runtime.actors import create_coordinator, create_reward_group
from actors.serving import ServerConfig
from learner import checkpoint
from learner.actor import start_learner
from learner.config import Config, ConfigError
from learner.control.envs import EnvRegistry
from learner.control.registry import RewardRegistry
from learner.control.service import start_control_server
from learner.driver import ending
from learner.driver.errors import RunFailed, StopRequested
from learner.driver.evaluation import Evaluation, eval_line
from learner.driver.fleet import RolloutFleet
from learner.driver.placement import place, placement_group, report_placement
from learner.driver.policy import resolve_policy, resolve_rollout_dtype
from learner.driver.report import RunReport, peak_memory, run_summary
from learner.driver.sources import build_prompts
from learner.driver.status import run_status
from learner.driver.supervisor import Supervisor
from learner.driver.steps import StepLoop
from learner.driver.weight_sync import CollectiveSync, WeightSync


class Trainer(StepLoop):
    def __init__(self, cfg: Config, run_dir: str | Path, *, out=sys.stdout, progress: bool = True,
                 stop_requested: threading.Event | None = None, segments: list[dict] | None = None,
                 eval_before: float | None = None, reward_models: list | None = None):
        """``stop_requested``: set (e.g. by a signal handler) to end the run after the current
        step; ``segments``, ``eval_before`` and ``reward_models`` (the registered reward
        models' specs, registered again at setup): what earlier segments of a restarted run had."""
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.progress = progress
        self.prompts = None  # built in setup(): a chat template needs the policy's tokenizer
        self.evaluation: Evaluation | None = None
        self.evals: list[dict] = []  # this segment's evaluations, oldest first
        self.t_rl: float | None = None
        self.max_new_tokens = cfg.rollout.max_new_tokens
        self.steps = cfg.train.steps  # data.epochs may end the run earlier (setup)
        self.step = 0
        self.control = None
        self.registry = None
        self.pg = None
        self.resume = None
        self.stop_requested = stop_requested or threading.Event()  # set from another thread: stop after this step
        self.segments = list(segments or [])  # earlier segments of a restarted run (``run.py``)
        self.eval_before = eval_before
        self.carried_models = list(reward_models or [])
        self.final_models: list = list(self.carried_models)  # registered models' specs when the run ended
        self.supervisor = None
        self.summary: dict | None = None
        self.setup_s = 0.0
        self.report: RunReport | None = None
        self.weights: WeightSync | None = None
        self.prefetched = None  # the next batch's request, when sampling runs ahead
        self.waiting = None  # a batch request the driver gave up on (run failing)

    def say(self, msg: str) -> None:
        print(msg, file=self.out, flush=True)

    @property
    def counters(self) -> dict:
        """The coordinator's counters after the last weight publish."""
        return self.weights.counters if self.weights is not None else {}

    @property
    def history(self) -> list[dict]:
        return self.report.history if self.report is not None else []

    @property
    def last_metrics(self) -> dict:
        return self.history[-1] if self.history else {}

    # -- setup -----------------------------------------------------------------------------------
    def setup(self) -> None:
        """Policy and task, then the actors (coordinator, learner, reward, rollout), Control,
        placement; resume if asked; every worker starts from the learner's weights."""
        cfg = self.cfg
        t0 = time.perf_counter()
        (self.run_dir / "config.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
        self.setup_policy_and_prompts()
        if cfg.train.resume:
            self.resume = checkpoint.find_checkpoint(cfg.train.resume, self.run_dir, self.say)
        point = self.resume[1] if self.resume else {"step": 0, "cursor": 0, "skip": []}
        if self.resume:
            self.check_same_data(point)
        self.coordinator = create_coordinator(
            self.prompts.source, start=point["cursor"], skip=point["skip"], start_step=point["step"],
            groups_per_step=cfg.train.prompts_per_step, prompts_per_request=cfg.rollout.prompts_per_request,
            max_staleness=cfg.train.max_staleness, total_groups=self.steps * cfg.train.prompts_per_step)
        self.pg, bundles = placement_group(cfg, name=f"fleetrl-{self.run_dir.name}")
        self.pg_id = self.pg.id.hex() if self.pg is not None else None
        self.create_actors(bundles)
        self.start_control()
        self.register_carried_models()
        report_placement(self.run_dir, place(cfg, self.learner, self.rollouts, self.rewards,
                                             timeout_s=cfg.rollout.replace_timeout_s), self.say)
        if self.resume:
            self.step = ray.get(self.learner.load_state.remote(str(self.resume[0])))
            self.say(f"resumed from {self.resume[0]} at step {self.step} (prompt cursor {point['cursor']})")
        self.complete(self.sync_weights(None))  # every worker starts from the learner's weights (version 0, or the resumed one)
        self.learner_dtype = ray.get(self.learner.compute_dtype_name.remote(), timeout=60)  # loaded: it answers at once
        if cfg.learner.dtype == "auto" and self.learner_dtype == "bfloat16":
            self.say("learner: computes in bfloat16 (learner.dtype auto; float32 master weights and AdamW state)")
        self.setup_s = time.perf_counter() - t0

    def setup_policy_and_prompts(self) -> None:
        """Check the reward functions, resolve (or build) the policy, build the prompt source
        (the built-in task or the datasets) and the held-out evaluation."""
        cfg = self.cfg
        for spec in cfg.reward.functions:  # fail here, naming the key, not inside an actor
            load_reward_fn(spec, cfg.reward.function_args.get(spec))
        self.policy_path, self.warm_start = resolve_policy(cfg, self.run_dir)
        if self.warm_start:
            ws = self.warm_start
            took = "cached" if ws["cached"] else f"{ws['seconds']}s"
            self.say(f"built-in policy: {self.policy_path} (warm start: {ws['steps']} supervised steps on "
                     f"{ws['labelled']} labelled examples, validation accuracy {ws['val_accuracy']:.2f}, {took})")
        self.prompts = build_prompts(cfg, self.policy_path, self.say)
        for line in self.prompts.notes:
            self.say(line)
        self.max_new_tokens, self.steps = self.prompts.max_new_tokens, self.prompts.steps
        if self.prompts.eval:
            self.evaluation = Evaluation(self.prompts.eval, cfg.eval, verifier=self.prompts.verifier,
                                         source_key=cfg.data.source_key if cfg.data.enabled else "")

    def data_identity(self) -> dict:
        """What a checkpoint records of the dataset its prompt cursor counts in (nothing for a task)."""
        src = self.prompts.source if self.prompts else None
        if not hasattr(src, "fingerprint"):
            return {}
        return {"data_rows": src.size, "data_order": [src.shuffle, src.seed], "data_fingerprint": src.fingerprint}

    def check_same_data(self, point: dict) -> None:
        """A prompt cursor means (epoch, position) only over the same rows in the same order: a different
        row count, data.shuffle or data.seed is an error, other changes (the files were rewritten, the
        config renders them differently) a warning."""
        mine = self.data_identity()
        if "data_rows" not in point and not mine:
            return
        if point.get("data_rows") != mine.get("data_rows"):
            raise ConfigError(f"train.resume: the checkpoint's prompt cursor counts in {point.get('data_rows', 'no')} "
                              f"dataset rows, this run has {mine.get('data_rows', 'none (a built-in task)')}: resume "
                              f"with the data.* settings and files of the run that wrote it")
        if point.get("data_order") != mine["data_order"]:
            raise ConfigError(f"train.resume: the checkpoint's epochs were shuffled with data.shuffle/data.seed "
                              f"{point.get('data_order')}, this run has {mine['data_order']}: the same rows would be "
                              f"trained twice in an epoch")
        if point.get("data_fingerprint") != mine["data_fingerprint"]:
            self.say("warning: the dataset changed since the checkpoint (files or data.* settings); the resumed "
                     "run continues at the same epoch and position of the new rows")

    def env_config(self) -> EnvConfig | None:
        """The ``env`` section, or the environment the built-in task needs when it names none;
        None for single-turn runs."""
        env = self.cfg.env
        if not env.enabled and self.prompts.env:
            env = dataclasses.replace(env, name=self.prompts.env)
        return env if env.enabled else None

    def create_actors(self, bundles: list[dict]) -> None:
        """The learner (bundle 0), the weight sync, the reward workers and the rollout fleet."""
        cfg = self.cfg
        self.rollout_dtype = resolve_rollout_dtype(cfg, policy_numel(self.policy_path))  # once, for every worker
        if cfg.rollout.dtype == "auto" and self.rollout_dtype == "bfloat16":
            self.say("rollout workers: bfloat16 weights (rollout.dtype auto)")
        self.learner_ranks = start_learner(self.policy_path, cfg.learner, placement=bundles[0],
                                           timeout_s=cfg.rollout.replace_timeout_s, total_steps=self.steps,
                                           temperature=cfg.rollout.temperature, seed=cfg.train.seed,
                                           max_new_tokens=self.max_new_tokens, publish_dtype=self.rollout_dtype,
                                           lora=cfg.model.lora)
        self.learner = self.learner_ranks.rank0
        collective = None
        if cfg.train.weight_sync == "collective":
            collective = CollectiveSync(self.learner, backend=cfg.train.weight_sync_backend,
                                        timeout_s=cfg.train.weight_sync_timeout_s,
                                        startup_timeout_s=cfg.rollout.replace_timeout_s)
        self.weights = WeightSync(self.learner, self.coordinator, collective=collective, say=self.say)
        n_roll = cfg.rollout.num_workers
        self.rewards = create_reward_group(cfg.reward, bundles[1 + n_roll:] if self.pg else None)
        ray.get(self.coordinator.set_reward_actors.remote(self.rewards.actors))
        self.rollouts = RolloutFleet(self.policy_path, dataclasses.replace(cfg.rollout, dtype=self.rollout_dtype),
                                     coordinator=self.coordinator,
                                     default_max_new_tokens=self.max_new_tokens, seed=cfg.train.seed, say=self.say,
                                     env=self.env_config(), lora=cfg.model.lora,
                                     reward=cfg.reward if cfg.reward.colocate else None)
        self.rollouts.bundles = bundles[1:1 + n_roll] if self.pg else []
        self.rollouts.on_start = self.weights.for_newcomers
        self.rollouts.create(n_roll)
        self.registry = RewardRegistry(self.rewards.actors, reserved_names=cfg.reward.functions, control=cfg.control,
                                       coordinator=self.coordinator)
        self.supervisor = Supervisor(learner=self.learner, coordinator=self.coordinator, rewards=self.rewards,
                                     reward_cfg=cfg.reward, registry=self.registry,
                                     replace_timeout_s=cfg.rollout.replace_timeout_s, say=self.say)

    def start_control(self) -> None:
        c = self.cfg.control
        if not c.enabled:
            return
        try:
            self.control = start_control_server(self.registry, self.status, ServerConfig(
                host=c.host, port=c.port, token_file=c.token_file, tls_cert=c.tls_cert, tls_key=c.tls_key),
                scale_fn=self.rollouts.request_scale,
                envs=EnvRegistry(self.rollouts.set_remote_envs, reserved=(self.cfg.env.name,)))
        except (OSError, ValueError) as e:
            raise RunFailed(f"control server (control.host {c.host}, control.port {c.port}): {e}") from None
        (self.run_dir / "control.json").write_text(json.dumps({"address": self.control.address}))
        self.say(f"control server listening on {self.control.address}"
                 f"{'' if self.control.authenticated else ' (no token: loopback only)'}")

    def register_carried_models(self) -> None:
        """After a restart: the reward models registered before it, registered again."""
        from learner.control.registry import ControlError

        for spec in self.carried_models:
            try:
                self.registry.register(spec)
                self.say(f"reward model {spec.name!r} registered again after the restart")
            except ControlError as e:
                self.say(f"reward model {spec.name!r} not registered again after the restart: {e}")

    # -- the run -------------------------------------------------------------------------------------
    def evaluate(self, when: str) -> float | None:
        """Held-out evaluation on the live rollout workers (``eval`` section), recorded in
        ``eval.jsonl`` and TensorBoard; returns the greedy accuracy (None without held-out
        prompts or with ``eval.greedy: false``)."""
        if self.evaluation is None:
            return None
        actors = {n: self.rollouts.workers[n].actor for n in self.rollouts.live}
        t0 = time.perf_counter()
        # the final evaluation is not abandoned on a stop request (a second Ctrl-C exits at once)
        m = self.evaluation.run(actors, self.coordinator, self.stop_requested if when != "after" else None)
        m["eval_s"] = round(time.perf_counter() - t0, 3)
        m["when"] = when
        completions = m["prompts"] * (int(self.cfg.eval.greedy) + self.cfg.eval.num_samples)
        if m["excluded"] >= completions:
            self.say(f"warning: the evaluation's verifier {self.prompts.verifier[0]!r} could not score any of the "
                     f"{completions} completions (is data.answer_key set? eval.reward?)")
        self.evals.append({"step": self.step, **m})
        if self.report is not None:
            self.report.eval(self.step, m, time_s=time.perf_counter() - self.t_rl if self.t_rl else 0.0,
                             policy_version=m["policy_version"])
        if when != "during":
            self.say(eval_line(f"held-out evaluation {when} RL", m))
        return m.get("greedy_accuracy")

    def start_rollouts(self) -> None:
        self.rollouts.start()

    def stop_rollouts(self, timeout_s: float = 60.0) -> dict:
        """Stop generation, let in-flight groups land, drop what was not trained."""
        ray.get(self.coordinator.stop.remote(), timeout=timeout_s)
        self.rollouts.wait_stopped(timeout_s)
        # a batch request still open returns its groups to the buffer (or hands them out)
        # once it sees the stop; let it, so that drain() accounts for them
        open_requests = [r for r in (self.prefetched, self.waiting) if r is not None]
        ray.wait(open_requests, num_returns=len(open_requests), timeout=timeout_s)
        self.prefetched = self.waiting = None
        return ray.get(self.coordinator.drain.remote(), timeout=timeout_s)

    def train(self) -> dict:
        """Setup, held-out evaluation, the training loop, a final checkpoint, evaluation and
        summary. On a stop request or a failure the run still ends with a checkpoint (when
        the learner can give one) and ``summary.json`` (``status`` stopped/failed and why);
        a failure is raised again after that."""
        cfg = self.cfg
        t_start = time.perf_counter()
        try:
            self.setup()
            self.report = RunReport(self.run_dir, total_steps=self.steps, progress=self.progress, out=self.out,
                                    log_every=cfg.train.log_every, resume_step=self.step if self.resume else None,
                                    watch=cfg.watch, run_config=asdict(cfg))
            if self.eval_before is None:
                self.eval_before = self.evaluate("before")
        except StopRequested:  # Ctrl-C during the first evaluation: nothing was generated for training yet
            self.report.close(draw=False)
            self.say("stopping before training: stop requested")
            return self.write_summary("stopped", "stop requested (signal or Control) before training", None,
                                      wall_t0=t_start)
        except (RunFailed, ray.exceptions.RayError) as e:
            failure = e if isinstance(e, RunFailed) else ending.failure_from(self, e, "setup")
            if self.report is not None:
                self.report.close()
            self.write_summary("failed", str(failure), None, wall_t0=t_start)
            raise failure from None
        t_rl = self.t_rl = time.perf_counter()
        failure, ended = None, "finished"
        try:
            self.start_rollouts()
            ended = self.run_steps(t_rl)
            if not cfg.train.checkpoint_every or self.step % cfg.train.checkpoint_every:  # the end of the run
                self.save_checkpoint(timeout_s=cfg.train.stop_timeout_s if ended == "stopped" else None)
        except RunFailed as e:
            failure = e
        except ray.exceptions.RayError as e:  # e.g. the learner died while writing a checkpoint
            failure = ending.failure_from(self, e)
        except Exception as e:  # noqa: BLE001 - a bug or an OSError: still one line, a summary, the traceback in a file
            failure = ending.unexpected(self.run_dir, e)
        finally:
            self.report.close(draw=False)  # report.png is drawn with the summary
        stats = ending.wind_down(self)
        if failure is not None:
            ending.save_what_can_be_saved(self, failure)
            self.write_summary("failed", str(failure), stats, rl_s=time.perf_counter() - t_rl, wall_t0=t_start)
            raise failure
        if ended == "stopped":
            return self.write_summary("stopped", "stop requested (signal or Control)", stats,
                                      rl_s=time.perf_counter() - t_rl, wall_t0=t_start)
        try:
            return self.finish(stats, rl_s=time.perf_counter() - t_rl, wall_t0=t_start)
        except ray.exceptions.RayError as e:  # e.g. the learner died in the final evaluation
            failure = ending.failure_from(self, e, "the final evaluation")
            self.write_summary("failed", str(failure), stats, rl_s=time.perf_counter() - t_rl, wall_t0=t_start)
            raise failure from None

    # -- the end ---------------------------------------------------------------------------------------
    def finish(self, stats: dict, *, rl_s: float, wall_t0: float) -> dict:
        """Evaluate, save the policy, write ``summary.json``; returns the summary."""
        eval_after = self.evaluate("after")
        policy_dir = ray.get(self.learner.save_policy.remote(str((self.run_dir / "policy").resolve())))
        if self.cfg.model.lora.enabled and self.cfg.model.lora.save_merged:
            ray.get(self.learner.save_merged_policy.remote(str((self.run_dir / "policy-merged").resolve())))
        memory = peak_memory(self.learner, self.rollouts.actors, self.rewards.actors)
        if len(self.learner_ranks.actors) > 1:  # every rank's: sharding is about memory per rank
            memory["learner_ranks"] = [w["peak_rss_mib"] for w in ray.get(self.learner.ranks_where.remote(), timeout=30)]
        self.say("peak RSS (MiB): " + ", ".join(f"{k} {v}" for k, v in memory.items()))
        return self.write_summary("finished", "", stats, rl_s=rl_s, wall_t0=wall_t0, eval_after=eval_after,
                                  extra={"policy_dir": policy_dir, "peak_rss_mib": memory})

    def write_summary(self, status: str, reason: str, stats: dict | None, *, wall_t0: float, rl_s: float = 0.0,
                      eval_after: float | None = None, extra: dict | None = None) -> dict:
        """``summary.json``: this run's (and, after restarts, every segment's) outcome."""
        extra = {"evals": self.evals, "data": {**(self.prompts.info if self.prompts else {}),
                                                 **((stats or self.counters or {}).get("data") or {})}, **(extra or {})}
        summary = run_summary(self, status, reason, stats, rl_s=rl_s, wall_s=time.perf_counter() - wall_t0,
                              eval_after=eval_after, extra=extra)
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.summary = summary
        if self.report is not None and self.cfg.watch.plot:
            self.report.draw()
        return summary

    def save_checkpoint(self, *, timeout_s: float | None = None) -> Path:
        """A checkpoint of step ``self.step``. The prompt stream's resume point comes with the
        counters of that step's publish (nothing is committed between a publish and the
        checkpoint after it), so it is the same whether the coordinator still lives or not."""
        path = checkpoint.write_checkpoint(self.run_dir, self.step,
                                           lambda d: ray.get(self.learner.save_state.remote(d, self.step),
                                                             timeout=timeout_s),
                                           {**self.counters["resume_point"], **self.data_identity()})
        checkpoint.prune_checkpoints(self.run_dir, keep=self.cfg.train.keep_checkpoints)
        return path

    def status(self) -> dict:
        """What ``fleetrl status`` shows (``status.run_status``)."""
        return run_status(self)

    def stop_control(self) -> None:
        if self.control is not None:
            self.control.stop(grace_s=2.0)
            self.control = None
        if self.registry is not None:
            self.registry.close()

    def shutdown(self) -> None:
        """Kill this run's actors and placement group (a shared cluster keeps running)."""
        self.stop_control()
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.pg)
            self.pg = None
        if getattr(self, "learner_ranks", None) is not None:
            self.learner_ranks.kill()
        for a in [getattr(self, "learner", None), getattr(self, "coordinator", None),
                  *getattr(getattr(self, "rollouts", None), "actors", []),
                  *getattr(getattr(self, "rewards", None), "actors", [])]:
            if a is not None:
                ray.kill(a)

