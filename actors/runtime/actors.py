"""The torch-free Ray actors around the plain workers, and their factories.

``RewardActor``, ``RewardModelActor`` and ``CoordinatorActor`` wrap
``RewardWorker``, one reward model and ``Coordinator``; ``ActorSet`` is a set of
actors the driver queries together; ``watched`` gives an actor the ``watch()``
the driver supervises it by. The rollout actor is ``rollout_actor.py`` and the
learner's is ``learner/actor.py``: they need torch and transformers, these
actors do not, and Ray imports an actor class's module in the actor's process,
so keeping them apart spares the coordinator and reward processes ~1.5 s of
imports each at every start (measured: a 3-step test run's setup
went from 9.7-11.9 s to 8.5-9.7 s).
"""

from __future__ import annotations

import logging
import threading

import ray

from actors.reward.worker import RewardConfig, RewardWorker
from actors.runtime.coordinator import Coordinator
from actors.runtime.placement import actor_env, where
from actors.types import Group

log = logging.getLogger(__name__)


def watched(cls):
    """Give an actor class a ``watch()`` that never returns, in a concurrency group of its own:
    the driver holds the ref of one ``watch`` call per actor, and ``ray.wait`` on those
    refs tells it the moment an actor dies (the ref fails), without polling."""
    def watch(self) -> None:
        threading.Event().wait()

    cls.watch = ray.method(concurrency_group="watch")(watch)
    return cls


WATCH_GROUP = {"watch": 1}
"""The ``concurrency_groups`` every watched actor class is made remote with
(``ray.remote(concurrency_groups=...)``: ``.options`` does not take it)."""


@watched
class RewardActor:
    """Ray actor around ``RewardWorker``."""

    def __init__(self, cfg: RewardConfig):
        self.worker = RewardWorker.from_config(cfg)

    def where(self) -> dict:
        return where()

    def score_and_put(self, groups: list[Group], coordinator) -> None:
        ray.get(coordinator.put.remote(self.worker.score(groups)))

    def set_models(self, models: list[tuple[str, float, object, float, int]]) -> None:
        """``(name, weight, RewardModelActor handle, seconds per call, batch size)`` per
        run-time reward model; a score waits at most calls x seconds per call + 30 s."""

        def submitter(handle, per_call_s, batch_size):
            def submit(batch):
                calls = -(-len(batch) // max(1, batch_size))
                ref = handle.score.remote(batch)
                return lambda: ray.get(ref, timeout=calls * per_call_s + 30.0)

            return submit

        self.worker.set_models([(name, weight, submitter(h, per_call_s, bs))
                                for name, weight, h, per_call_s, bs in models])


class RewardModelActor:
    """Ray actor around one registered reward model (remote server or local checkpoint)."""

    def __init__(self, spec):
        from actors.reward.models import make_reward_model

        self.model = make_reward_model(spec)

    def score(self, batch):
        """A ``ScoreBatch`` -> per sample a validated score or an ``Excluded`` (the model validates)."""
        return self.model.score(batch)

    def info(self) -> dict:
        return self.model.info()

    def probe(self) -> dict:
        return self.model.probe()

    def trial(self) -> bool:
        """The circuit's half-open trial while no traffic comes (``RemoteRewardClient.trial``)."""
        return self.model.trial()

    def close(self) -> None:
        self.model.close()


class CoordinatorActor(Coordinator):
    """The coordinator with its prompt stream built inside the actor (generators don't pickle).

    ``source`` has ``prompt_stream(start)``: a built-in task (``TaskPrompts``) or a dataset
    (``actors.data.source.DatasetPrompts``, which also reports its epoch and position)."""

    def __init__(self, source, *, start: int = 0, skip: list[int] = (), **kwargs):
        skip = set(skip)
        stream = (p for p in source.prompt_stream(start) if p.uid not in skip)
        super().__init__(stream, start_uid=start, committed_uids=sorted(skip),
                         progress=getattr(source, "progress", None), **kwargs)

    def where(self) -> dict:
        return where()

    async def get_batch_ref(self, version: int, timeout_s: float) -> list:
        """``get_batch``, with the groups put in the object store: returns ``[ref]``.
        The driver passes the ref on to the learner without fetching the groups."""
        return [ray.put(await self.get_batch(version, timeout_s))]


class ActorSet:
    """Named actors the driver queries together (the reward workers, the rollout fleet)."""

    def __init__(self, actors: dict[str, object] | None = None):
        self.by_name: dict[str, object] = dict(actors or {})

    @property
    def actors(self) -> list:
        return list(self.by_name.values())

    def where(self, timeout_s: float | None = None) -> list[dict]:
        """Each actor's ``where()`` with its name; raises ``GetTimeoutError`` after ``timeout_s``."""
        names = list(self.by_name)
        found = ray.get([self.by_name[n].where.remote() for n in names], timeout=timeout_s)
        return [dict(name=n, **w) for n, w in zip(names, found)]


def create_reward_actor(cfg: RewardConfig, placement: dict | None = None):
    return ray.remote(concurrency_groups=WATCH_GROUP)(RewardActor).options(
        num_cpus=cfg.num_cpus, resources=cfg.resources or None, runtime_env=actor_env(1),
        **(placement or {})).remote(cfg)


def create_reward_group(cfg: RewardConfig, placements: list[dict] | None = None) -> ActorSet:
    placements = placements or [{}] * cfg.num_workers
    return ActorSet({f"reward-{i}": create_reward_actor(cfg, p) for i, p in enumerate(placements)})


def create_reward_model_actor(spec, *, num_cpus: float = 0.0):
    """One actor per registered reward model; it may serve several reward workers at once.
    0 CPUs by default: a gRPC client waits on the network, and a run's CPUs are all
    reserved by its workers (the defaults add up to 2)."""
    return ray.remote(RewardModelActor).options(num_cpus=num_cpus, max_concurrency=8,
                                                runtime_env=actor_env(1)).remote(spec)


def create_coordinator(source, **kwargs):
    """``source``: ``TaskPrompts`` or ``DatasetPrompts`` (see ``CoordinatorActor``)."""
    return ray.remote(CoordinatorActor).options(num_cpus=0).remote(source, **kwargs)
