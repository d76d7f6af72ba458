"""The rollout actor: ``RolloutWorker`` as a Ray actor, and its factory.

Apart from ``actors.py`` because it imports torch and transformers (Ray imports
an actor class's module inside the actor's process; the torch-free actors there
start faster without them).
"""

from __future__ import annotations

import ray

from actors.envs.config import EnvConfig
from actors.reward.worker import RewardConfig, RewardWorker
from actors.rollout.worker import RolloutConfig, RolloutWorker
from actors.runtime import object_store
from actors.runtime.placement import actor_env, where
from actors.runtime.rollout_loop import run_rollout_loop
from actors.types import Group, Prompt
from actors.weights.flat import weights_digest
from actors.weights.lora import LoraSpec


class RolloutActor:
    """Ray actor around ``RolloutWorker``."""

    def __init__(self, model_path: str, cfg: RolloutConfig, *, default_max_new_tokens: int, name: str, seed: int,
                 env: EnvConfig | None = None, remote_envs: dict | None = None, lora: LoraSpec | None = None,
                 reward: RewardConfig | None = None):
        """``reward``: score in this actor with these functions (``reward.colocate``)."""
        self.scorer = RewardWorker.from_config(reward) if reward is not None else None
        self.worker = RolloutWorker(model_path, cfg, default_max_new_tokens=default_max_new_tokens, name=name,
                                    seed=seed, fetch_weights=object_store.fetch, env=env, lora=lora)
        self.worker.set_remote_envs(remote_envs or {})
        self.name = name
        self.verifiers: dict = {}

    def where(self) -> dict:
        return where()

    def evaluate(self, prompts: list[Prompt], cfg, verifier: tuple[str, dict], source_key: str,
                 coordinator) -> tuple[list, int]:
        """Held-out evaluation (``actors.rollout.evaluate``) with the coordinator's newest weights;
        ``verifier``: a reward function's name and arguments. Runs on a second thread: the
        worker's lock keeps each chunk of it between the streaming loop's generate calls."""
        from actors.reward.functions import load_reward_fn

        latest = ray.get(coordinator.latest_weights.remote())
        key = (verifier[0], repr(sorted(verifier[1].items())))
        if key not in self.verifiers:
            self.verifiers[key] = load_reward_fn(verifier[0], verifier[1] or None)
        with self.worker.lock:
            if latest is not None and latest.version > self.worker.policy_version:
                self.worker.load_weights(latest)
        return self.worker.evaluate(prompts, cfg, verify=self.verifiers[key], source_key=source_key)

    def policy_version(self) -> int:
        return self.worker.policy_version

    def generate(self, prompts: list[Prompt]) -> list[Group]:
        return self.worker.generate(prompts)

    def load_weights(self, payload) -> bool:
        return self.worker.load_weights(payload)

    def weights_digest(self) -> str:
        return weights_digest(self.worker.receiver.flat)  # what payloads land in (the adapters with LoRA)

    def engine_info(self) -> dict:
        """What the worker's rollout engine holds (``Engine.info``) and its ``policy_version``."""
        return {**self.worker.engine.info(), "policy_version": self.worker.policy_version}

    # -- collective weight sync (actors.weights.collective): called by the driver, on the
    # actor's second thread while ``run`` generates on the first
    def sync_device(self) -> dict:
        return self.worker.staged.device_info()

    def sync_join(self, spec, rank: int) -> None:
        self.worker.staged.join(spec, rank)

    def sync_receive(self, epoch: int) -> int:
        return self.worker.staged.receive(epoch)

    def set_remote_envs(self, specs) -> None:
        """The environments registered over Control (``learner.control.envs``)."""
        self.worker.set_remote_envs(specs)

    def run(self, coordinator) -> dict:
        """Stream until the coordinator says stop; returns this worker's counters."""
        return run_rollout_loop(self.worker, coordinator, scorer=self.scorer)


def create_rollout_actor(model_path: str, cfg: RolloutConfig, *, name: str, seed: int, default_max_new_tokens: int,
                         placement: dict | None = None, env: EnvConfig | None = None,
                         remote_envs: dict | None = None, lora: LoraSpec | None = None,
                         reward: RewardConfig | None = None):
    cls = ray.remote(RolloutActor).options(
        num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, resources=cfg.resources or None,
        # 4 threads: the run loop, collective weight-sync calls, evaluation, and quick queries
        # (where, version) that must not wait behind a broadcast
        runtime_env=actor_env(cfg.num_threads), max_concurrency=4, **(placement or {}))
    return cls.remote(model_path, cfg, default_max_new_tokens=default_max_new_tokens, name=name, seed=seed, env=env,
                      remote_envs=remote_envs, lora=lora, reward=reward)
