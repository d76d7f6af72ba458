"""The streaming loop one rollout actor runs until the coordinator says stop:

    acquire prompts (waits at the staleness gate); newer weights come with them
    -> load those weights (only here, between generate calls)
    -> generate a group per prompt
    -> hand the groups to a reward actor, which scores them and puts them into
       the coordinator's buffer (one reward call in flight per worker, so
       scoring overlaps the next generation); with ``reward.colocate`` the
       worker scores them itself and puts them, unless run-time reward models
       are registered (the reward actors hold those).

The reward actors are the coordinator's current list (the driver replaces a
dead one). If the reward actor of a call dies, the loop sends the same groups
to a live one from the list, waiting up to ``REWARD_RESEND_TIMEOUT_S`` for the
replacement: nothing is lost, and a group the dead actor had already put is
counted once (the coordinator drops the second put as ``duplicate``). A
rollout worker therefore never fails because a reward worker did.

When told to stop, the loop loads the newest weights if they are newer than its
own (still between generate calls) before it returns: a worker ends on the
run's final version.
"""

from __future__ import annotations

import time

import ray

REWARD_RESEND_TIMEOUT_S = 300.0
"""How long a loop waits for a live reward actor after the one it used died."""


class RewardDispatch:
    """One reward call in flight; re-sent to a live reward actor if its actor dies."""

    def __init__(self, coordinator, *, resend_timeout_s: float = REWARD_RESEND_TIMEOUT_S):
        self.coordinator, self.resend_timeout_s = coordinator, resend_timeout_s
        self.actors = ray.get(coordinator.reward_actors.remote())
        self.dead: set = set()
        self.calls = 0
        self.resent = 0
        self.pending = None  # (ref, actor, groups)

    def _live(self) -> list:
        return [a for a in self.actors if a._actor_id not in self.dead]

    def _send(self, groups) -> None:
        deadline = time.monotonic() + self.resend_timeout_s
        while not self._live():
            if time.monotonic() > deadline:
                raise RuntimeError(f"no live reward worker for {self.resend_timeout_s:.0f}s")
            time.sleep(0.2)
            self.actors = ray.get(self.coordinator.reward_actors.remote())
        live = self._live()
        actor = live[self.calls % len(live)]
        self.calls += 1
        self.pending = (actor.score_and_put.remote(groups, self.coordinator), actor, groups)

    def submit(self, groups) -> None:
        """Wait for the previous call, then send ``groups``."""
        self.wait()
        self._send(groups)

    def done(self) -> bool:
        return self.pending is None or bool(ray.wait([self.pending[0]], timeout=0)[0])

    def wait(self) -> None:
        """Wait until the call in flight has put its groups (re-sending after a reward actor died)."""
        while self.pending is not None:
            ref, actor, groups = self.pending
            try:
                ray.get(ref)
                self.pending = None
            except ray.exceptions.RayTaskError:  # the call itself failed (e.g. its put): not a reward death
                raise
            except ray.exceptions.ActorUnavailableError:  # transient: the same actor again, shortly
                time.sleep(0.5)
                self.pending = (actor.score_and_put.remote(groups, self.coordinator), actor, groups)
            except ray.exceptions.RayActorError:  # the reward actor died: send the groups again
                self.dead.add(actor._actor_id)
                self.actors = ray.get(self.coordinator.reward_actors.remote())
                self.resent += 1
                self._send(groups)


class LocalScoring:
    """``reward.colocate``: a ``RewardWorker`` in this process scores the groups, which go straight
    to the coordinator (one put in flight, so the put overlaps the next generation)."""

    def __init__(self, scorer, coordinator):
        self.scorer, self.coordinator = scorer, coordinator
        self.calls = 0
        self.pending = None

    def submit(self, groups) -> None:
        self.wait()
        self.calls += 1
        self.pending = self.coordinator.put.remote(self.scorer.score(groups))

    def done(self) -> bool:
        return self.pending is None or bool(ray.wait([self.pending], timeout=0)[0])

    def wait(self) -> None:
        if self.pending is not None:
            ray.get(self.pending)
            self.pending = None


def run_rollout_loop(worker, coordinator, scorer=None) -> dict:
    """Drive ``worker`` (a ``RolloutWorker``) until the coordinator hands out no more
    prompts; returns its counters. ``scorer``: a ``RewardWorker`` (``reward.colocate``)."""
    remote = RewardDispatch(coordinator)
    local = LocalScoring(scorer, coordinator) if scorer is not None else None
    rewards = remote
    # start from the learner's weights, not our own from_pretrained copy (they differ
    # when a checkpoint leaves some weights to random initialisation)
    payload = ray.get(coordinator.latest_weights.remote())
    if payload is not None:
        worker.load_weights(payload, force=True)
    while True:
        prompts, _, newer, models = ray.get(coordinator.acquire.remote(worker.name, 5.0, worker.policy_version))
        if prompts is None:
            break
        route = remote if local is None or models else local
        if route is not rewards:  # one scoring call in flight across both routes
            rewards.wait()
            rewards = route
        if rewards.done():
            rewards.wait()  # surfaces an error now, not as a timeout later
        if newer is not None:  # the newest weights came with the prompts (or with a closed gate's answer)
            worker.load_weights(newer)
        if not prompts:
            continue
        rewards.submit(worker.generate(prompts))
    rewards.wait()
    latest = ray.get(coordinator.latest_weights.remote())
    if latest is not None and latest.version > worker.policy_version:
        worker.load_weights(latest)  # end on the newest version
    return {"name": worker.name, "generate_calls": remote.calls + (local.calls if local else 0),
            "samples": worker.generated_samples, "policy_version": worker.policy_version,
            "reward_resends": remote.resent, "scored_here": local.calls if local else 0}
