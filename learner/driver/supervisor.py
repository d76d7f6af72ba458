"""Every actor of a run is watched: the driver learns of a death when it happens.

Each watched actor (learner, coordinator, reward workers) runs one ``watch()``
call that never returns (``actors.runtime.actors.watched``); the driver waits
on those refs together with the batch and the rollout loops, so a death is an
event, not a timeout. Rollout workers are watched through their loops
(``fleet.py``).

* **learner or coordinator dead**: ``RunFailed(component=...)``; the trainer
  saves what it can, and ``train.max_restarts`` restarts the run from its
  newest checkpoint (``run.py``).
* **reward worker dead**: replaced by a new one (``reward.max_replacements``),
  which gets the registered reward models before the coordinator lists it; the
  rollout loops re-send the groups the dead one held (``rollout_loop.py``).
* **registered reward model unhealthy** (its circuit is open, or its actor
  is dead): rollout pauses (the coordinator closes its gate at the first
  sample that lacks the model's term; the supervisor at its next check) (no prompt is handed out, so nothing is generated
  that could only be dropped; samples in flight are scored and, lacking that
  model's term, excluded). After ``reward.model_disable_after_s`` the model is
  *disabled*: taken out of the reward sum with an event line and a
  ``disabled`` entry in ``fleetrl reward list``, and rollout resumes on the
  remaining reward terms. Removing it (or its circuit closing) resumes at once;
  registering the same name again brings a fixed model back. No sample is
  trained on a sum that silently lacks a term.
"""

from __future__ import annotations

import time

import ray

from actors.runtime.actors import ActorSet, create_reward_actor
from actors.reward.worker import RewardConfig
from learner.driver.errors import RunFailed

HEALTH_EVERY_S = 1.0
CALL_TIMEOUT_S = 30.0
"""Deadline of the supervisor's own calls to the coordinator."""


def _reason(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}" if str(error) else type(error).__name__


class Supervisor:
    def __init__(self, *, learner, coordinator, rewards: ActorSet, reward_cfg: RewardConfig, registry,
                 replace_timeout_s: float, say=print, clock=time.monotonic):
        self.learner, self.coordinator, self.rewards = learner, coordinator, rewards
        self.reward_cfg, self.registry, self.say, self.clock = reward_cfg, registry, say, clock
        self.replace_timeout_s = replace_timeout_s
        self.watch: dict = {}  # watch ref -> component name
        self.reward_replacements = 0
        self.next_reward_id = len(rewards.by_name)
        self.unhealthy_since: dict[str, float] = {}
        self.paused_by: str | None = None
        self.last_health = -HEALTH_EVERY_S
        self.events: list[dict] = []
        self.dead: set[str] = set()  # the learner and/or the coordinator, once found dead
        self._watch("learner", learner)
        self._watch("coordinator", coordinator)
        for name, actor in rewards.by_name.items():
            self._watch(name, actor)

    def _watch(self, name: str, actor) -> None:
        self.watch[actor.watch.remote()] = name

    def event(self, kind: str, detail: str) -> None:
        self.events.append({"time": round(time.time(), 3), "event": kind, "detail": detail})
        self.say(detail)

    def refs(self) -> list:
        return list(self.watch)

    # -- deaths --------------------------------------------------------------------------------------
    def handle(self, ref) -> None:
        """A watch ref resolved: its actor died. Replace a reward worker; fail for the learner
        or the coordinator."""
        name = self.watch.pop(ref, None)
        if name is None:
            return
        try:
            ray.get(ref)
            error = "its watch returned"
        except ray.exceptions.RayError as e:
            error = _reason(e)
        if name in ("learner", "coordinator"):
            self.dead.add(name)
            self.event("died", f"{name} died ({error})")
            raise RunFailed(f"{name} died ({error})", component=name)
        self.replace_reward(name, error)

    def check_core(self, timeout_s: float = 0.0) -> None:
        """Raise ``RunFailed`` if the learner or the coordinator is dead (waits up to
        ``timeout_s`` for the news: a failed call can arrive before its actor's watch fails)."""
        core = [r for r, n in self.watch.items() if n in ("learner", "coordinator")]
        ready, _ = ray.wait(core, num_returns=1, timeout=timeout_s) if core else ([], [])
        for ref in ready:
            self.handle(ref)

    def replace_reward(self, name: str, error: str) -> None:
        actor = self.rewards.by_name.pop(name, None)
        if actor is not None:
            ray.kill(actor, no_restart=True)
        if self.reward_replacements >= self.reward_cfg.max_replacements:
            raise RunFailed(f"{name} died ({error}) and reward.max_replacements={self.reward_cfg.max_replacements} "
                            f"replacements are used up", component=name)
        self.reward_replacements += 1
        new = f"reward-{self.next_reward_id}"
        self.next_reward_id += 1
        handle = create_reward_actor(self.reward_cfg)
        try:
            ray.get(handle.where.remote(), timeout=self.replace_timeout_s)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError) as e:
            ray.kill(handle)
            if not self.rewards.by_name:
                raise RunFailed(f"{name} died ({error}); no reward worker is alive and no replacement started "
                                f"within rollout.replace_timeout_s={self.replace_timeout_s}s: {_reason(e)}",
                                component=name) from None
            self.event("reward_not_replaced", f"{name} died ({error}); a replacement did not start, "
                                              f"continuing with {len(self.rewards.by_name)}")
        else:
            self.rewards.by_name[new] = handle
            if self._has_models(new, handle):  # the registered models first ...
                self._watch(new, handle)
                self.event("reward_replaced", f"{name} died ({error}); replaced by {new}")
        # ... then the rollout loops see it
        ray.get(self.coordinator.set_reward_actors.remote(self.rewards.actors), timeout=CALL_TIMEOUT_S)

    def _has_models(self, new: str, handle) -> bool:
        """Push the registered reward models; a new worker that did not take them is not used
        (it would score without their terms)."""
        if self.registry is None:
            return True
        try:
            self.registry.set_reward_actors(self.rewards.actors)
            return True
        except Exception as e:  # noqa: BLE001 - ControlError(UNAVAILABLE): a worker did not confirm
            del self.rewards.by_name[new]
            ray.kill(handle)
            if not self.rewards.by_name:
                raise RunFailed(f"{new} (a replacement reward worker) did not take the registered reward models: "
                                f"{e}", component=new) from None
            self.event("reward_not_replaced", f"{new} did not take the registered reward models ({e}); continuing "
                                              f"with {len(self.rewards.by_name)}")
            return False

    # -- registered reward models ------------------------------------------------------------------
    def tick(self) -> None:
        """At most once a second: pause rollout while a registered model is unhealthy, resume
        when none is, disable one that stayed unhealthy for ``reward.model_disable_after_s``."""
        now = self.clock()
        if self.registry is None or now - self.last_health < HEALTH_EVERY_S:
            return
        self.last_health = now
        health = self.registry.health()
        for name in list(self.unhealthy_since):
            if health.get(name, True):
                del self.unhealthy_since[name]
        for name, ok in health.items():
            if not ok:
                self.unhealthy_since.setdefault(name, now)
        for name, since in list(self.unhealthy_since.items()):
            if now - since >= self.reward_cfg.model_disable_after_s:
                del self.unhealthy_since[name]
                reason = (f"unhealthy for {now - since:.0f}s (reward.model_disable_after_s="
                          f"{self.reward_cfg.model_disable_after_s:g})")
                if not self._disable(name, reason):
                    continue
                self.event("reward_model_disabled", f"reward model {name!r} disabled: {reason}; the run "
                                                    f"continues on the other reward terms")
        self._set_pause(", ".join(sorted(self.unhealthy_since)) or None)

    def _disable(self, name: str, reason: str) -> bool:
        from learner.control.registry import ControlError

        try:
            self.registry.disable(name, reason)
            return True
        except ControlError:  # removed over Control meanwhile: nothing to disable
            return False

    def _set_pause(self, who: str | None) -> None:
        if who is None:  # also opens a gate the coordinator closed itself (a late unhealthy sample)
            self.coordinator.pause.remote(None)
        if who == self.paused_by:
            return
        reason = f"reward model(s) {who} unhealthy" if who else None
        if who:
            ray.get(self.coordinator.pause.remote(reason), timeout=CALL_TIMEOUT_S)
            self.event("rollout_paused", f"rollout paused: {reason} (disabled after "
                                         f"reward.model_disable_after_s={self.reward_cfg.model_disable_after_s:g}s)")
        else:
            self.event("rollout_resumed", "rollout resumed: every registered reward model is healthy or disabled")
        self.paused_by = who
