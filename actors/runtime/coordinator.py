"""The coordinator: hands out prompts, buffers scored groups, holds the weights.

One asyncio object (a Ray async actor in production, a plain object in unit
tests) owns the three pieces of shared state whose consistency matters:

* the **prompt stream** and its cursor (prompts are handed out once);
* the **bounded buffer** of scored groups and the trajectory counters;
* the **weight store** (newest payload and its ``policy_version``).

Staleness bound. The learner consumes ``groups_per_step`` groups per step and
is at version ``V`` while training on its ``V``-th batch (0-based). A prompt
is handed out only while ``live < (V + max_staleness + 1) * groups_per_step``,
where ``live`` counts groups handed out minus groups that will never be
trained. So with ``max_staleness = 0`` nothing for batch ``V + 1`` is generated
before the weights of version ``V + 1`` exist (strictly on-policy), and with
``k > 0`` generation runs up to ``k`` versions ahead, overlapping the update.
Groups still older than ``V - max_staleness`` when consumed (possible when
workers finish out of order) are dropped and counted, never trained on.

Accounting: every sample put into the buffer counts as *produced*; each is
eventually *trained* (its learner step committed) or *dropped* with a reason,
so at the end ``produced == trained + dropped`` exactly. A group is accepted
once: a second put of a prompt that is no longer in flight (a rollout worker
re-sends a group whose reward worker died after putting it) is counted as
produced and dropped as ``duplicate``.

Pause. ``pause(reason)`` closes the gate for every worker; ``pause(None)``
opens it again. The coordinator pauses itself the moment a sample arrives
that lacks a term because a registered reward model is unhealthy (its circuit
is open): everything generated after it would lack that term too. The driver
opens the gate again once the model is healthy, disabled or removed
(``learner.driver.supervisor``).

The coordinator also holds the current list of reward actors (the driver
replaces a dead one; the rollout loops read the list from here) and whether
run-time reward models are registered (then every group goes through them).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter, deque
from typing import Iterator, NamedTuple

from actors.types import Excluded, Exclusion, Group, Prompt
from actors.weights.payload import Payload, WeightStore


class SampleTimeout(RuntimeError):
    """No batch could be assembled before the deadline."""


class PromptsExhausted(RuntimeError):
    """A finite prompt stream (``data.epochs``) is used up: no further batch can be assembled."""


class Handout(NamedTuple):
    """What ``acquire`` returns to a rollout worker."""

    prompts: list[Prompt] | None
    """None: the run is stopping (the worker exits); []: the gate stayed closed (ask again)."""
    policy_version: int
    """The newest published version."""
    weights: Payload | None = None
    """The newest payload when it is newer than the caller's ``have_version`` (the weights come
    with the prompts: no second round trip to fetch them), else None."""
    models_registered: bool = False
    """Run-time reward models are enabled: the groups must go through the reward workers (which
    hold them) even where the rollout worker scores its own (``reward.colocate``)."""


class Coordinator:
    def __init__(self, prompts: Iterator[Prompt], *, groups_per_step: int, prompts_per_request: int,
                 max_staleness: int, total_groups: int | None = None, start_step: int = 0, start_uid: int = 0,
                 committed_uids: list[int] = (), progress=None):
        """``max_staleness`` and the sizes are validated by the config (``TrainConfig``);
        ``progress(cursor)``: where a dataset stream stands (``DatasetPrompts.progress``)."""
        self.prompts = prompts
        self.progress = progress
        self.exhausted = False  # the prompt stream has ended (a dataset's last epoch)
        self.groups_per_step = groups_per_step
        self.prompts_per_request = prompts_per_request
        self.max_staleness = max_staleness
        self.total_groups = total_groups  # never hand out more than the run will train
        self.weights = WeightStore()
        self.buffer: deque[Group] = deque()
        self.cond = asyncio.Condition()
        self.stopping = False
        self.issued_groups = 0
        self.abandoned_groups = 0  # handed out, will never be trained (dropped/excluded)
        self.produced = 0
        self.trained = 0
        self.trained_groups = 0
        self.handed: list[Group] = []  # given to the learner, not yet committed
        self.in_flight: dict[str, dict[int, Prompt]] = {}  # worker -> prompts handed out, not yet put
        self.requeue: deque[Prompt] = deque()  # prompts of lost workers, handed out first
        self.retiring: set[str] = set()
        self.reclaimed_prompts = 0
        self.reclaimed_uids: set[int] = set()
        self.start_uid = start_uid  # prompts before it were trained on before a resume
        self.committed_uids: set[int] = set(committed_uids)
        self.next_uid = start_uid  # one past the largest prompt uid handed out
        # a resumed run continues at version start_step: count its batches as issued and trained
        self.issued_groups = self.trained_groups = start_step * groups_per_step
        self.reclaimed_done: set[int] = set()
        self.dropped: Counter[str] = Counter()
        self.last_error: dict[str, str] = {}
        self.produced_by_worker: Counter[str] = Counter()
        self.paused: str | None = None  # why the gate is closed for everyone, or None
        self.reward_actor_list: list = []
        self.models_registered = False
        self.cursor = start_uid  # first prompt uid not trained on (committed_uids holds the ones after it)
        self._advance_cursor()

    # -- capacity ------------------------------------------------------------------
    def _limit(self) -> int:
        limit = (self.weights.version + self.max_staleness + 1) * self.groups_per_step
        return limit if self.total_groups is None else min(limit, self.total_groups)

    def _live(self) -> int:
        return self.issued_groups - self.abandoned_groups

    def capacity_bound(self) -> int:
        """Most groups that can ever be buffered or in flight at once."""
        return (self.max_staleness + 1) * self.groups_per_step

    # -- rollout side ----------------------------------------------------------------
    async def acquire(self, worker: str, timeout_s: float | None = None, have_version: int | None = None) -> Handout:
        """Wait until the staleness gate opens; return the ``Handout``: prompts, the newest
        ``policy_version`` and, when that is newer than ``have_version`` (the caller's), its payload.

        ``prompts`` is ``None`` once the run is stopping (the worker should exit)
        and ``[]`` when ``timeout_s`` passed with the gate closed (ask again).
        """
        def ready():
            return self.stopping or worker in self.retiring or (
                self.paused is None and (bool(self.requeue) or (self._live() < self._limit()
                                                                 and not self.exhausted)))

        async with self.cond:
            try:
                await asyncio.wait_for(self.cond.wait_for(ready), timeout_s)
            except asyncio.TimeoutError:
                return self._handout([], have_version)
            if self.stopping or worker in self.retiring:
                return self._handout(None, have_version)
            batch = []
            while self.requeue and len(batch) < self.prompts_per_request:  # a lost worker's prompts first
                batch.append(self.requeue.popleft())
            if not batch:
                n = min(self.prompts_per_request, self._limit() - self._live())
                batch = list(itertools.islice(self.prompts, n))
                if len(batch) < n:
                    self.exhausted = True
                    self.cond.notify_all()  # a learner waiting for a batch that can no longer fill
                self.issued_groups += len(batch)
                self.next_uid = max([self.next_uid] + [p.uid + 1 for p in batch])
            self.in_flight.setdefault(worker, {}).update({p.uid: p for p in batch})
            return self._handout(batch, have_version)

    def _handout(self, prompts: list[Prompt] | None, have_version: int | None) -> Handout:
        newer = have_version is not None and self.weights.payload is not None and self.weights.version > have_version
        return Handout(prompts, self.weights.version, self.weights.payload if newer else None,
                       self.models_registered)

    async def reclaim(self, worker: str) -> int:
        """``worker`` is gone: its prompts in flight go back out, first in line, to the
        other workers (they were counted as issued once; they stay counted once)."""
        async with self.cond:
            # an acquire of the lost worker can still be parked at the gate (the call outlives
            # its caller): when the gate opens it must not hand that worker prompts
            self.retiring.add(worker)
            lost = self.in_flight.pop(worker, {})
            self.requeue.extend(lost.values())
            self.reclaimed_uids.update(lost)
            self.reclaimed_prompts += len(lost)
            self.cond.notify_all()
            return len(lost)

    async def pause(self, reason: str | None) -> None:
        """Close the gate for every worker (``reason``), or open it again (None)."""
        async with self.cond:
            self.paused = reason
            self.cond.notify_all()

    def set_reward_actors(self, actors: list) -> None:
        self.reward_actor_list = list(actors)

    def reward_actors(self) -> list:
        return self.reward_actor_list

    def set_models_registered(self, registered: bool) -> None:
        """Set by the registry after the reward workers took the models (or dropped the last)."""
        self.models_registered = registered

    async def watch(self) -> None:
        """Never returns: the driver holds this call's ref, which fails when the actor dies."""
        await asyncio.Event().wait()

    async def retire(self, worker: str) -> None:
        """Let ``worker`` finish what it holds, then hand it no more prompts (scale down)."""
        async with self.cond:
            self.retiring.add(worker)
            self.cond.notify_all()

    def _settle(self, g: Group) -> bool:
        """Mark ``g``'s prompt as returned. False for a duplicate: a reclaimed prompt can
        come back twice (late from the lost worker's reward call, and from the worker it
        was handed to again); the first one to arrive counts, the other is dropped."""
        uid = g.prompt.uid
        held = self.in_flight.get(g.worker, {}).pop(uid, None) is not None
        if uid not in self.reclaimed_uids:
            return held  # not in flight any more: this group was put already
        for i, p in enumerate(self.requeue):  # not handed out again yet: it is settled now
            if p.uid == uid:
                del self.requeue[i]
                break
        if uid in self.reclaimed_done:
            return False
        self.reclaimed_done.add(uid)
        return True

    async def put(self, groups: list[Group]) -> None:
        """Add scored groups; fully excluded groups are counted and dropped here.

        After ``stop()`` nothing enters the buffer any more: late groups are
        counted as produced and dropped (``end_of_run``) at once, so the
        counters stay exact whenever they are read.
        """
        async with self.cond:
            for g in groups:
                self.produced += g.size
                self.produced_by_worker[g.worker] += g.size
                if not self._settle(g):
                    self.dropped["duplicate"] += g.size
                    continue
                usable = g.trainable_samples()
                for s in g.samples:
                    if not any(s is u for u in usable):
                        self._count_excluded(g, s)
                        self._pause_if_unhealthy(s.excluded)
                if not usable:
                    self.abandoned_groups += 1
                    self._settle_uid(g.prompt.uid)  # never trained, and never retried (as without a resume)
                elif self.stopping:
                    self._drop_group(g, "end_of_run")
                else:
                    self.buffer.append(g)
            self.cond.notify_all()

    def latest_weights(self) -> Payload | None:
        return self.weights.payload

    # -- learner side ----------------------------------------------------------------
    async def get_batch(self, version: int, timeout_s: float) -> list[Group]:
        """Return ``groups_per_step`` fresh groups for a learner at ``version``.

        Groups generated by a version older than ``version - max_staleness`` are
        dropped (counted as ``stale``). Raises ``SampleTimeout`` if no new group
        arrives for ``timeout_s`` seconds; on any failure (including
        cancellation) the groups already taken go back to the buffer. The
        batch's samples count as *trained* only once ``publish(...,
        commit_groups=...)`` confirms the learner step.
        """
        oldest = version - self.max_staleness
        batch: list[Group] = []
        async with self.cond:
            try:
                while len(batch) < self.groups_per_step:
                    while self.buffer and len(batch) < self.groups_per_step:
                        g = self.buffer.popleft()
                        if g.policy_version < oldest:
                            self._drop_group(g, "stale")
                            self._settle_uid(g.prompt.uid)
                            self.cond.notify_all()  # frees a slot at the gate
                        else:
                            batch.append(g)
                    if len(batch) == self.groups_per_step:
                        break
                    if self.stopping:
                        raise SampleTimeout("coordinator is stopping")
                    if self._starved():
                        raise PromptsExhausted(f"the prompt stream ended ({len(batch)}/{self.groups_per_step} "
                                               f"groups for version {version})")
                    try:
                        await asyncio.wait_for(self.cond.wait_for(
                            lambda: bool(self.buffer) or self.stopping or self._starved()), timeout_s)
                    except asyncio.TimeoutError:
                        raise SampleTimeout(
                            f"no scored group arrived for {timeout_s:.0f}s (have {len(batch)}/"
                            f"{self.groups_per_step} for version {version}); {self.stats()}") from None
            except BaseException:
                self.buffer.extendleft(reversed(batch))  # lose nothing
                raise
            self.handed.extend(batch)
            return batch

    async def publish(self, payload: Payload, *, commit_groups: int = 0) -> dict:
        """Store the newest weights (opening the staleness gate for the next
        batch) and commit the oldest ``commit_groups`` handed-out groups as
        trained: the learner step that produced ``payload`` consumed them.
        Returns the counters."""
        async with self.cond:
            if commit_groups > len(self.handed):
                raise ValueError(f"commit of {commit_groups} groups, only {len(self.handed)} handed out")
            done, self.handed = self.handed[:commit_groups], self.handed[commit_groups:]
            # excluded samples of partly usable groups were counted at put()
            self.trained += sum(len(g.trainable_samples()) for g in done)
            self.trained_groups += len(done)
            self.committed_uids.update(g.prompt.uid for g in done)
            self._advance_cursor()
            self.weights.put(payload)
            self.cond.notify_all()
            return self.stats()

    def _settle_uid(self, uid: int) -> None:
        """A prompt that is done without being trained (fully excluded, stale): the resume point
        moves past it, so a resumed run does not retry what an uninterrupted one would not, and
        the list of uids after the cursor stays short."""
        self.committed_uids.add(uid)
        self._advance_cursor()

    def _starved(self) -> bool:
        """No group can arrive any more: the stream ended and nothing is in flight or re-queued."""
        return self.exhausted and not self.requeue and not any(self.in_flight.values())

    def _advance_cursor(self) -> None:
        while self.cursor in self.committed_uids:
            self.committed_uids.discard(self.cursor)
            self.cursor += 1

    def resume_point(self) -> dict:
        """Where a resumed run picks up the prompt stream: the first prompt not settled
        (trained, or dropped as stale / fully excluded), and the settled prompts after it
        (so none is trained twice)."""
        return {"cursor": self.cursor, "skip": sorted(self.committed_uids)}

    # -- shutdown ------------------------------------------------------------------------
    async def stop(self) -> None:
        async with self.cond:
            self.stopping = True
            self.cond.notify_all()

    async def drain(self) -> dict:
        """Drop everything buffered or handed out but never committed (end of
        run); returns the final counters, read under the same lock."""
        async with self.cond:
            while self.buffer:
                self._drop_group(self.buffer.popleft(), "end_of_run")
            for g in self.handed:
                self._drop_group(g, "not_trained")
            self.handed.clear()
            return self.stats()

    def _drop_group(self, g: Group, reason: str) -> None:
        self.dropped[reason] += len(g.trainable_samples())
        self.abandoned_groups += 1

    def stats(self) -> dict:
        return {
            "policy_version": self.weights.version,
            "produced": self.produced,
            "trained": self.trained,
            "dropped": sum(self.dropped.values()),
            "dropped_by_reason": dict(self.dropped),
            "buffered_groups": len(self.buffer),
            "issued_groups": self.issued_groups,
            "in_flight_groups": self._live() - len(self.buffer) - len(self.handed) - self.trained_groups,
            "produced_by_worker": dict(self.produced_by_worker),
            "last_error": dict(self.last_error),
            "reclaimed_prompts": self.reclaimed_prompts,
            "requeued_prompts": len(self.requeue),
            "in_flight_by_worker": {w: len(p) for w, p in self.in_flight.items() if p},
            "paused": self.paused or "",
            "resume_point": self.resume_point(),
            "data": self.progress(self.cursor) if self.progress else {},
        }

    def _pause_if_unhealthy(self, why: Excluded | None) -> None:
        if why is not None and why.kind is Exclusion.REWARD_UNHEALTHY and self.paused is None:
            self.paused = f"a registered reward model is unhealthy: {why.detail[:200]}"

    def _count_excluded(self, g: Group, s) -> None:
        """Count an unusable sample under its reason's kind (``Exclusion``: the counter key)."""
        why = g.excluded or s.excluded or Excluded(Exclusion.UNSCORED, "no reward was set")
        self.dropped[why.kind.value] += 1
        self.last_error[why.kind.value] = str(why)
