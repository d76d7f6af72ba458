"""The learner as Ray actors: ``start_learner`` / ``create_learner`` and what only an actor needs.

``LearnerActor`` is the plain ``Learner`` plus where it runs and the collective
weight-sync calls the driver makes (``learner.driver.weight_sync``), delegated to
the learner's rank-0 role (``Learner.broadcast``). Placed by the learner's declared
``num_cpus``/``num_gpus``/resources, so it can sit on a GPU node.

With ``learner.num_workers`` N > 1 there are N such actors in a placement group of
their own (``learner.placement``; one node by default), joined as FSDP2 ranks
(``learner.ranks``). The driver holds rank 0 only: each of its calls that the ranks
must make together (a step, a checkpoint, a policy save) rank 0 starts on the others
and runs itself, and a rank that died makes the call fail naming it.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray

from actors.runtime import object_store
from actors.runtime.actors import WATCH_GROUP, watched
from actors.runtime.placement import actor_env, bundle, in_bundle, where
from actors.weights.collective import GroupSpec
from actors.weights.payload import Payload
from learner import ranks
from learner.learner import Learner, LearnerConfig


class RankFailed(RuntimeError):
    """A learner rank died or failed during a call the ranks make together."""


@watched
class LearnerActor(Learner):
    def __init__(self, model_path: str, cfg: LearnerConfig, **kwargs):
        super().__init__(model_path, cfg, put_weights=object_store.put, **kwargs)
        self.peers: list = []  # rank 0: the other ranks' actors
        self.out_of_step: str | None = None  # rank 0: a joint call failed, the ranks may sit in a collective
        self.failed_step: str | None = None  # a step or publish failed: nothing queued behind it runs

    def where(self) -> dict:
        return where()

    def compute_dtype_name(self) -> str:
        """The autocast dtype the learner resolved (``learner.dtype`` auto depends on the node's CPU)."""
        return str(self.compute_dtype).removeprefix("torch.")

    def version(self) -> int:
        """``policy_version`` (a property of the plain learner; actors expose methods)."""
        return self.policy_version

    # -- learner ranks ---------------------------------------------------------------------------------
    def rendezvous(self) -> str:
        """Rank 0: the address the ranks' process group meets at (a free port on this node)."""
        return ranks.free_address(ray.util.get_node_ip_address())

    def join(self, address: str, rank: int, world_size: int, peers: list) -> None:
        self.peers = list(peers)
        self.join_ranks(address, rank, world_size)

    def ranks_where(self) -> list[dict]:
        """Every rank's ``where`` (peak memory per rank), rank 0 first."""
        return [self.where(), *ray.get([p.where.remote() for p in self.peers])]

    def _everywhere(self, method: str, *args, **kwargs):
        """Run ``method`` on every rank at once (rank 0 here); rank 0's result, or RankFailed
        naming the rank that died or raised."""
        if not self.peers:  # one rank: nothing to start elsewhere
            return getattr(Learner, method)(self, *args, **kwargs)
        if self.out_of_step:
            raise RankFailed(self.out_of_step)
        refs = [getattr(p, method).remote(*args, **kwargs) for p in self.peers]
        try:
            out = getattr(Learner, method)(self, *args, **kwargs)
        except Exception as e:
            failure = self._rank_failure(method, refs, e)
            self.out_of_step = f"learner ranks out of step since {method} failed ({_first_line(failure)})"
            raise failure from None
        for i, ref in enumerate(refs, start=1):
            try:
                ray.get(ref)
            except ray.exceptions.RayError as e:
                self.out_of_step = f"learner rank {i} failed in {method}: {_first_line(e)}"
                raise RankFailed(self.out_of_step) from None
        return out

    def _rank_failure(self, method: str, refs: list, error: Exception) -> Exception:
        """Rank 0 failed in ``method``: a rank that died, or failed otherwise than rank 0, explains it
        best; when every rank failed alike (the same bad input), rank 0's own error."""
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=5.0)
        for i, ref in enumerate(refs, start=1):
            if ref in ready:
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    return RankFailed(f"learner rank {i} died in {method}: {_first_line(e)}")
                except ray.exceptions.RayTaskError as e:
                    if type(getattr(e, "cause", None)) is not type(error):
                        return RankFailed(f"learner rank {i} failed in {method}: {_first_line(e)}")
        return error

    def train_step(self, groups, preview: int = 0) -> dict:
        self._refuse_after_a_failed_step("train_step")
        try:
            return self._everywhere("train_step", groups, preview)
        except BaseException as e:
            self.failed_step = f"step {self.policy_version + 1} failed: {_first_line(e)}"
            raise

    def publish_weights(self, expect_version: int | None = None) -> Payload:
        """``expect_version``: the version the queued step should have reached; a learner at
        another one (the step never ran: its batch could not be fetched) publishes nothing and
        refuses what follows, so a batch it did not train on is never committed as trained."""
        self._refuse_after_a_failed_step("publish_weights")
        try:
            if expect_version is not None and expect_version != self.policy_version:
                raise RuntimeError(f"publish of version {expect_version} asked of a learner at version "
                                   f"{self.policy_version} (its step did not run)")
            return super().publish_weights()
        except BaseException as e:
            self.failed_step = f"publish of version {expect_version or self.policy_version} failed: {_first_line(e)}"
            raise

    def _refuse_after_a_failed_step(self, method: str) -> None:
        """The driver queues step n + 1 (and its publish) before it reads step n's result:
        after a failed step or publish, what was queued behind it must not run (the driver
        ends the run at the failure, and a checkpoint must match its counters)."""
        if self.failed_step is not None:
            raise RuntimeError(f"{method} refused: {self.failed_step}")

    def save_state(self, path: str, expect_version: int | None = None) -> None:
        return self._everywhere("save_state", path, expect_version)

    def load_state(self, path: str) -> int:
        return self._everywhere("load_state", path)

    def save_policy(self, path: str) -> str:
        return self._everywhere("save_policy", path)

    # -- collective weight sync (rank 0) -----------------------------------------------------------------
    def sync_device(self) -> dict:
        return self.broadcast.device_info()

    def sync_open_store(self) -> tuple[str, int]:
        return self.broadcast.open_store(ray.util.get_node_ip_address())

    def sync_join(self, spec: GroupSpec, rank: int) -> None:
        self.broadcast.join(spec, rank)

    def sync_broadcast(self, epoch: int) -> Payload:
        return self.broadcast.broadcast(epoch)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    lines = [x for x in text.splitlines() if x.strip() and not x.startswith(("Traceback", "  "))]
    return (lines[-1] if lines else type(e).__name__)[:300]


@dataclass
class LearnerRanks:
    """The learner's actors: ``rank0`` is the one the driver talks to."""

    actors: list
    group: object | None = None  # the ranks' placement group (N > 1)

    @property
    def rank0(self):
        return self.actors[0]

    def kill(self) -> None:
        for a in self.actors:
            ray.kill(a)
        if self.group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.group)
            self.group = None


def _actor(model_path: str, cfg: LearnerConfig, placement: dict | None, kwargs: dict):
    """One learner actor (OpenMP keeps its default spinning waits: see ``actor_env``)."""
    return ray.remote(concurrency_groups=WATCH_GROUP)(LearnerActor).options(
        num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, resources=cfg.resources or None,
        runtime_env=actor_env(cfg.num_threads, passive_omp=False), **(placement or {})).remote(model_path, cfg, **kwargs)


def start_learner(model_path: str, cfg: LearnerConfig, placement: dict | None = None, *,
                  timeout_s: float = 600.0, **kwargs) -> LearnerRanks:
    """The learner: one actor, or ``cfg.num_workers`` ranks in a placement group of their own,
    joined (each loads the policy, then they shard it together) before this returns."""
    n = cfg.num_workers
    if n == 1:
        return LearnerRanks([_actor(model_path, cfg, placement, kwargs)])
    from ray.util.placement_group import placement_group

    group = placement_group([bundle(cfg.num_cpus, cfg.num_gpus, cfg.resources)] * n, strategy=cfg.placement.upper())
    out = LearnerRanks([], group)
    try:
        ray.get(group.ready(), timeout=timeout_s)
        out.actors = [_actor(model_path, cfg, in_bundle(group, i), kwargs) for i in range(n)]
        address = ray.get(out.rank0.rendezvous.remote(), timeout=timeout_s)
        ray.get([a.join.remote(address, i, n, out.actors[1:] if i == 0 else []) for i, a in enumerate(out.actors)],
                timeout=timeout_s)
    except Exception:
        out.kill()
        raise
    return out


def create_learner(model_path: str, cfg: LearnerConfig, placement: dict | None = None, **kwargs):
    """The learner's rank-0 actor (see ``start_learner``)."""
    return start_learner(model_path, cfg, placement, **kwargs).rank0
