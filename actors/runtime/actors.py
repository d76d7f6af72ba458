"""Turns the plain workers into Ray actors and runs the streaming loop.

The only module in ``actors`` that knows about Ray actors. ``RolloutActor.run``
is the continuous loop of one rollout worker:

    acquire prompts (waits at the staleness gate)
    -> load newer weights if the coordinator has them
    -> generate a group per prompt
    -> hand the groups to a reward actor, which scores them and puts them
       into the coordinator's buffer (one reward call in flight per worker,
       so scoring overlaps the next generation).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import ray
import torch

from actors.runtime.coordinator import Coordinator
from actors.reward.worker import RewardConfig, RewardWorker
from actors.rollout.worker import RolloutConfig, RolloutWorker
from actors.tasks.base import make_task
from actors.types import Group, Prompt

log = logging.getLogger(__name__)


def actor_env(num_threads: int, *, passive_omp: bool = True) -> dict:
    """Runtime env for actors sharing CPU cores: bounded threads; passive OpenMP
    waits for side actors so they yield the cores when idle. The learner keeps
    OpenMP's default (spinning) waits: passive made its step 1.6x slower here
    (75 vs 47 ms for 128 samples on 2 threads, measured in one process)."""
    env = {"OMP_NUM_THREADS": str(num_threads), "TOKENIZERS_PARALLELISM": "false"}
    if passive_omp:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return {"env_vars": env}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (``ru_maxrss`` is KiB on Linux)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def where() -> dict:
    """Where this actor runs, and its peak resident memory so far (MiB)."""
    ctx = ray.get_runtime_context()
    pg = ray.util.get_current_placement_group()
    return {"node_id": ctx.get_node_id(), "host": socket.gethostname(), "pid": os.getpid(),
            "node_ip": ray.util.get_node_ip_address(), "placement_group": pg.id.hex() if pg else None,
            "peak_rss_mib": peak_rss_mib()}


def bundle(num_cpus: float, num_gpus: float = 0.0, resources: dict | None = None) -> dict:
    """The placement-group bundle an actor with these requirements occupies."""
    b = {"CPU": num_cpus, "GPU": num_gpus, **(resources or {})}
    return {k: v for k, v in b.items() if v > 0} or {"CPU": 0.01}


def in_bundle(pg, index: int | None) -> dict:
    """Actor options that schedule it into bundle ``index`` of ``pg`` (nothing if no pg)."""
    if pg is None or index is None:
        return {}
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=pg,
                                                                    placement_group_bundle_index=index)}


def weights_digest(flat) -> str:
    """sha256 of a policy's flat parameter buffers (a ``FlatParams`` or its ``buffers``
    dict; compare weights across actors)."""
    import hashlib

    h = hashlib.sha256()
    for name, buf in sorted(getattr(flat, "buffers", flat).items()):
        h.update(name.encode())
        h.update(buf.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class RolloutActor:
    """Ray actor around ``RolloutWorker``."""

    def __init__(self, model_path: str, cfg: RolloutConfig, *, default_max_new_tokens: int, name: str, seed: int):
        self.worker = RolloutWorker(model_path, cfg, default_max_new_tokens=default_max_new_tokens, name=name,
                                    seed=seed)
        self.name = name

    def where(self) -> dict:
        return where()

    def policy_version(self) -> int:
        return self.worker.policy_version

    def generate(self, prompts: list[Prompt]) -> list[Group]:
        return self.worker.generate(prompts)

    def load_weights(self, payload) -> bool:
        return self.worker.load_weights(payload)

    def weights_digest(self) -> str:
        return weights_digest(self.worker.flat)

    # -- collective weight sync (actors.weights.collective): called by the driver, on the
    # actor's second thread while ``run`` generates on the first
    def sync_device(self) -> dict:
        return self.worker.staged.device_info()

    def sync_join(self, spec, rank: int) -> None:
        self.worker.staged.join(spec, rank)

    def sync_receive(self, epoch: int) -> int:
        return self.worker.staged.receive(epoch)

    def run(self, coordinator, reward_actors: list) -> dict:
        """Stream until the coordinator says stop; returns this worker's counters."""
        pending = None
        calls = 0
        # start from the learner's weights, not our own from_pretrained copy (they differ
        # when a checkpoint leaves some weights to random initialisation)
        payload = ray.get(coordinator.latest_weights.remote())
        if payload is not None:
            self.worker.load_weights(payload, force=True)
        while True:
            prompts, version = ray.get(coordinator.acquire.remote(self.name, 5.0))
            if prompts is None:
                break
            if pending is not None and ray.wait([pending], timeout=0)[0]:
                ray.get(pending)  # surfaces a dead reward actor now, not as a timeout later
                pending = None
            if not prompts:
                continue
            if version > self.worker.policy_version:
                self.worker.load_weights(ray.get(coordinator.latest_weights.remote()))
            groups = self.worker.generate(prompts)
            if pending is not None:
                ray.get(pending)
            pending = reward_actors[calls % len(reward_actors)].score_and_put.remote(groups, coordinator)
            calls += 1
        if pending is not None:
            ray.get(pending)
        return {"name": self.name, "generate_calls": calls, "samples": self.worker.generated_samples,
                "policy_version": self.worker.policy_version}


class RewardActor:
    """Ray actor around ``RewardWorker``."""

    def __init__(self, cfg: RewardConfig):
        self.worker = RewardWorker.from_config(cfg)

    def where(self) -> dict:
        return where()

    def score(self, groups: list[Group]) -> list[Group]:
        return self.worker.score(groups)

    def score_and_put(self, groups: list[Group], coordinator) -> None:
        ray.get(coordinator.put.remote(self.worker.score(groups)))

    def set_models(self, models: list[tuple[str, float, object, float, int]]) -> None:
        """``(name, weight, RewardModelActor handle, seconds per call, batch size)`` per
        run-time reward model; a score waits at most calls x seconds per call + 30 s."""

        def submitter(handle, per_call_s, batch_size):
            def submit(prompts, completions, metadata):
                calls = -(-len(prompts) // max(1, batch_size))
                ref = handle.score.remote(prompts, completions, metadata)
                return lambda: ray.get(ref, timeout=calls * per_call_s + 30.0)

            return submit

        self.worker.set_models([(name, weight, submitter(h, per_call_s, bs))
                                for name, weight, h, per_call_s, bs in models])


class RewardModelActor:
    """Ray actor around one registered reward model (remote server or local checkpoint)."""

    def __init__(self, spec):
        from actors.reward.client import make_reward_model

        self.model = make_reward_model(spec)

    def score(self, prompts, completions, metadata):
        return self.model.score(prompts, completions, metadata)

    def info(self) -> dict:
        return self.model.info()

    def probe(self) -> dict:
        return self.model.probe()

    def close(self) -> None:
        self.model.close()


class CoordinatorActor(Coordinator):
    """The coordinator with its prompt stream built inside the actor (generators don't pickle)."""

    def __init__(self, task_name: str, task_kwargs: dict, *, start: int = 0, skip: list[int] = (), **kwargs):
        skip = set(skip)
        stream = (p for p in make_task(task_name, **task_kwargs).prompt_stream(start) if p.uid not in skip)
        super().__init__(stream, start_uid=start, committed_uids=sorted(skip), **kwargs)

    async def get_batch_ref(self, version: int, timeout_s: float) -> list:
        """``get_batch``, with the groups put in the object store: returns ``[ref]``.
        The driver passes the ref on to the learner without fetching the groups."""
        return [ray.put(await self.get_batch(version, timeout_s))]


@dataclass
class WorkerGroup:
    """A set of homogeneous actors created with the same resources."""

    actors: list
    names: list[str]

    def where(self, timeout_s: float | None = None) -> list[dict]:
        found = ray.get([a.where.remote() for a in self.actors], timeout=timeout_s)
        return [dict(name=n, **w) for n, w in zip(self.names, found)]


def create_rollout_actor(model_path: str, cfg: RolloutConfig, *, name: str, seed: int, default_max_new_tokens: int,
                         placement: dict | None = None):
    cls = ray.remote(RolloutActor).options(
        num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, resources=cfg.resources or None,
        # 3 threads: the run loop, collective weight-sync calls, and quick queries (where, version)
        # that must not wait behind a broadcast
        runtime_env=actor_env(cfg.num_threads), max_concurrency=3, **(placement or {}))
    return cls.remote(model_path, cfg, default_max_new_tokens=default_max_new_tokens, name=name, seed=seed)


def create_reward_group(cfg: RewardConfig, placements: list[dict] | None = None) -> WorkerGroup:
    names = [f"reward-{i}" for i in range(cfg.num_workers)]
    placements = placements or [{}] * len(names)
    actors = [ray.remote(RewardActor).options(num_cpus=cfg.num_cpus, resources=cfg.resources or None,
                                              runtime_env=actor_env(1), **p).remote(cfg) for p in placements]
    return WorkerGroup(actors, names)


def create_reward_model_actor(spec, *, num_cpus: float = 0.0):
    """One actor per registered reward model; it may serve several reward workers at once.
    0 CPUs by default: a gRPC client waits on the network, and a run's CPUs are all
    reserved by its workers (the defaults add up to 2)."""
    return ray.remote(RewardModelActor).options(num_cpus=num_cpus, max_concurrency=8,
                                                runtime_env=actor_env(1)).remote(spec)


def create_coordinator(task_name: str, task_kwargs: dict, **kwargs):
    return ray.remote(CoordinatorActor).options(num_cpus=0).remote(task_name, task_kwargs, **kwargs)
