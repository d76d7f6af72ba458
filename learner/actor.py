"""The learner as a Ray actor: ``create_learner`` and the methods only an actor needs.

``LearnerActor`` is the plain ``Learner`` plus where it runs and the
collective weight-sync calls the driver makes (``learner.driver.weight_sync``),
delegated to the learner's rank-0 role (``Learner.broadcast``). Placed by the
learner's declared ``num_cpus``/``num_gpus``/resources, so it can sit on a GPU node.
"""

from __future__ import annotations

import ray

from actors.runtime import object_store
from actors.runtime.actors import WATCH_GROUP, watched
from actors.runtime.placement import actor_env, where
from actors.weights.collective import GroupSpec
from actors.weights.payload import Payload
from learner.learner import Learner, LearnerConfig


@watched
class LearnerActor(Learner):
    def __init__(self, model_path: str, cfg: LearnerConfig, **kwargs):
        super().__init__(model_path, cfg, put_weights=object_store.put, **kwargs)

    def where(self) -> dict:
        return where()

    def version(self) -> int:
        """``policy_version`` (a property of the plain learner; actors expose methods)."""
        return self.policy_version

    def sync_device(self) -> dict:
        return self.broadcast.device_info()

    def sync_open_store(self) -> tuple[str, int]:
        return self.broadcast.open_store(ray.util.get_node_ip_address())

    def sync_join(self, spec: GroupSpec, rank: int) -> None:
        self.broadcast.join(spec, rank)

    def sync_broadcast(self, epoch: int) -> Payload:
        return self.broadcast.broadcast(epoch)


def create_learner(model_path: str, cfg: LearnerConfig, placement: dict | None = None, **kwargs):
    """Start the learner actor (OpenMP keeps its default spinning waits: see ``actor_env``)."""
    return ray.remote(concurrency_groups=WATCH_GROUP)(LearnerActor).options(
        num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, resources=cfg.resources or None,
        runtime_env=actor_env(cfg.num_threads, passive_omp=False), **(placement or {})).remote(model_path, cfg, **kwargs)
