"""How a new policy version reaches the rollout workers (driver side).

``WeightSync.submit`` (and ``collect``, which reads its result) is phase 3 of a
training step. Two transports:

* **object store** (``train.weight_sync: object_store``): the learner's
  publish is queued behind the update (a learner whose update failed refuses
  it, so a failed update publishes and commits nothing); the payload ref goes
  from the learner to the coordinator. ``submit`` only queues the chain and
  ``collect`` reads its end, so the driver can queue the next step in between.
* **collective** (``train.weight_sync: collective``): after the update the
  learner broadcasts to every rollout worker (``CollectiveSync``; the group is
  rebuilt first when the workers changed); the coordinator then gets a payload
  without refs. If the broadcast fails, this version goes through the object
  store and the group is rebuilt at the next sync (``fallbacks`` counts it).
  Workers created since the last build get the current version through the
  object store before they start (``for_newcomers``).

The version invariant is written in ``actors/weights/object_store.py`` and
extended in ``actors/weights/collective.py``.
"""

from __future__ import annotations

import time
from typing import Any

import ray

from actors.weights.collective import CollectiveConfigError, CollectiveSyncError, GroupSpec, choose_backend
from actors.weights.payload import Payload


class WeightSync:
    """Publishes each new version to the coordinator (and, collective, to the workers)."""

    def __init__(self, learner, coordinator, *, collective: "CollectiveSync | None" = None, say=print):
        self.learner, self.coordinator, self.collective, self.say = learner, coordinator, collective, say
        self.fallbacks = 0  # collective syncs that failed and went through the object store
        self.counters: dict = {}  # the coordinator's counters after the last publish

    @property
    def queues(self) -> bool:
        """True when a sync is only queued by ``submit`` (object store): the driver may queue
        the next step before it reads this one. A collective sync waits for the update."""
        return self.collective is None

    def submit(self, update, *, commit_groups: int, members: dict[str, Any],
               version: int | None = None) -> tuple[Any, Any]:
        """Publish the learner's weights after ``update`` (a ``train_step`` ref, or None for
        the initial publish) and commit ``commit_groups`` groups; returns ``(metrics,
        counters)`` for ``collect``: refs, or the metrics already read (collective).
        ``version``: the ``policy_version`` ``update`` brings the learner to (checked by the
        learner before it publishes).
        Raises ``CollectiveConfigError`` when the collective path cannot work at all."""
        m = None
        if self.collective is not None:
            m = ray.get(update) if update is not None else None
            payload = self._broadcast(members) or self.learner.publish_weights.remote()
        else:  # queued behind the update; the learner refuses it if the update failed or never ran
            payload, m = self.learner.publish_weights.remote(expect_version=version), update
        return m, self.coordinator.publish.remote(payload, commit_groups=commit_groups)

    def collect(self, metrics, counters) -> tuple[dict | None, int]:
        """The update's metrics and the new ``policy_version`` (``submit``'s results read)."""
        m = ray.get(metrics) if isinstance(metrics, ray.ObjectRef) else metrics
        self.counters = ray.get(counters)
        return m, self.counters["policy_version"]

    def _broadcast(self, members: dict[str, Any]) -> Payload | None:
        try:
            return self.collective.publish(members)
        except CollectiveConfigError:
            raise
        except CollectiveSyncError as e:
            self.fallbacks += 1
            self.say(f"warning: {e}; this version goes through the object store, the weight-sync group "
                     f"is rebuilt at the next sync")
            return None

    def for_newcomers(self, names: list[str]) -> None:
        """Workers outside the weight-sync group get the current version through the
        object store (the next sync builds a group that includes them)."""
        if self.collective is None:
            return
        if all(n in self.collective.members for n in names) and not self.collective.broken:
            return
        payload = self.learner.publish_weights.remote()
        self.counters = ray.get(self.coordinator.publish.remote(payload, commit_groups=0))

    def summary(self) -> dict:
        if self.collective is None:
            return {}
        c = self.collective
        return {"weight_sync_backend": c.backend, "weight_sync_groups": c.rebuilds,
                "weight_sync_broadcasts": c.broadcasts, "weight_sync_fallbacks": self.fallbacks}


def _reason(e: BaseException) -> str:
    cause = getattr(e, "cause", None) or e
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0][:300] if lines else ''}"


class CollectiveSync:
    """Driver side: builds weight-sync groups and runs one broadcast per published version."""

    def __init__(self, learner, *, backend: str = "auto", timeout_s: float = 60.0, startup_timeout_s: float = 120.0):
        self.learner = learner
        self.requested = backend
        self.timeout_s = timeout_s
        self.startup_timeout_s = startup_timeout_s  # a new worker may still be loading its model
        self.epoch = 0
        self.members: dict[str, Any] = {}
        self.backend: str | None = None
        self.broken = True  # no group yet
        self.rebuilds = 0
        self.broadcasts = 0
        self.last_broadcast_s = 0.0

    def publish(self, members: dict[str, Any]) -> Payload:
        """Broadcast the learner's current weights to ``members`` (name -> rollout actor),
        building a new group first if the members changed or the last sync failed.
        Returns the payload to announce (no refs). Raises ``CollectiveSyncError``."""
        if self.broken or list(members) != list(self.members):
            self.build(members)
        t0 = time.perf_counter()
        names = ["learner"] + list(self.members)
        refs = [self.learner.sync_broadcast.remote(self.epoch)] + \
               [a.sync_receive.remote(self.epoch) for a in self.members.values()]
        results = self._gather("broadcast", names, refs, self.timeout_s + 10.0)
        payload = results["learner"]
        wrong = {n: v for n, v in results.items() if n != "learner" and v != payload.version}
        if wrong:
            self.broken = True
            raise CollectiveSyncError(f"weight broadcast of version {payload.version}: members staged {wrong}")
        self.broadcasts += 1
        self.last_broadcast_s = time.perf_counter() - t0
        return payload

    def build(self, members: dict[str, Any]) -> None:
        """A new group (epoch + 1): the learner as rank 0, ``members`` as ranks 1..N."""
        self.broken = True
        self.members = {}
        names = ["learner"] + list(members)
        actors = [self.learner] + list(members.values())
        infos = self._gather("device check", names, [a.sync_device.remote() for a in actors],
                             self.startup_timeout_s)
        learner_fp = infos["learner"]["fingerprint"]
        other = {n: i["fingerprint"] for n, i in infos.items() if i["fingerprint"] != learner_fp}
        if other:
            raise CollectiveConfigError(f"weight layouts differ from the learner's {learner_fp}: {other} "
                                        f"(rollout.dtype must match what the learner publishes)")
        backend = choose_backend(self.requested, infos)
        (host, port), = self._gather("store", ["learner"], [self.learner.sync_open_store.remote()],
                                     self.timeout_s).values()
        self.epoch += 1
        spec = GroupSpec(self.epoch, host, port, len(actors), backend, self.timeout_s, learner_fp)
        self._gather("join", names, [a.sync_join.remote(spec, r) for r, a in enumerate(actors)], self.timeout_s + 10.0)
        self.members, self.backend, self.broken = dict(members), backend, False
        self.rebuilds += 1

    def _gather(self, what: str, names: list[str], refs: list, deadline_s: float) -> dict:
        """Results by name; waits for every ref (bounded) so that no rank is left mid-operation
        when this raises, then raises naming every rank that failed."""
        pending = dict(zip(refs, names))
        results, errors = {}, []
        deadline = time.monotonic() + deadline_s
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            for ref in ready:
                name = pending.pop(ref)
                try:
                    results[name] = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - reported with the rank's name below
                    errors.append((name, e))
        msgs = [f"{n} ({'rank 0' if n == 'learner' else 'member'}): {_reason(e)}" for n, e in errors]
        msgs += [f"{n}: no answer within {deadline_s:.0f}s" for n in pending.values()]
        if msgs:
            self.broken = True
            config = [e for _, e in errors if isinstance(getattr(e, "cause", None) or e, CollectiveConfigError)]
            cls = CollectiveConfigError if config else CollectiveSyncError
            raise cls(f"weight sync {what} failed (group epoch {self.epoch}, backend {self.backend or '-'}, "
                      f"timeout {self.timeout_s:.0f}s): " + "; ".join(msgs))
        return results
