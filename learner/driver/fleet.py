"""The rollout workers of a run, managed from the driver: start, scale, replace.

* **Scale up**: new workers are created and started; a worker's loop loads the
  coordinator's newest weights before its first generate, so it never
  generates with stale weights.
* **Scale down**: the newest workers are *retired*: the coordinator hands them
  no more prompts, they finish and hand in what they hold, their loops end.
  Nothing is lost or duplicated.
* **Replacement**: a worker whose loop fails (process killed, node lost) is
  replaced by a new one, and the prompts it held go back out first, to any
  worker (``Coordinator.reclaim``). After ``rollout.max_replacements``, or
  when no worker is alive and none can start within
  ``rollout.replace_timeout_s``, the run fails with a clear error.

With ``train.weight_sync: collective``, ``on_start`` lets the trainer publish
the current weights through the object store before workers that are not in
the weight-sync group start (``actors.weights.collective``, invariant 4).

With ``train.placement`` set, the first ``rollout.num_workers`` workers occupy
bundles of the run's placement group; workers added later (scale-up,
replacements) are scheduled by their resources alone.

Scale requests may come from another thread (the Control service); they are
applied by the driver thread in ``tick()``, between its waits.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import ray

from actors.runtime.actors import ActorSet
from actors.envs.config import EnvConfig
from actors.runtime.rollout_actor import create_rollout_actor
from actors.rollout.worker import RolloutConfig
from actors.validation import require
from actors.weights.lora import LoraSpec

log = logging.getLogger(__name__)


class FleetError(RuntimeError):
    """The rollout fleet cannot continue."""


@dataclass
class _Worker:
    actor: object
    loop: object = None
    retiring: bool = False


class RolloutFleet:
    def __init__(self, model_path: str, cfg: RolloutConfig, *, coordinator,
                 default_max_new_tokens: int, seed: int, say=print, env: EnvConfig | None = None,
                 lora: LoraSpec | None = None, reward=None):
        """``reward``: a ``RewardConfig`` whose functions every worker scores with itself
        (``reward.colocate``), or None."""
        self.model_path, self.cfg, self.env, self.lora, self.reward = model_path, cfg, env, lora, reward
        self.remote_envs: dict = {}  # environments registered over Control, for every worker
        self.coordinator = coordinator
        self.default_max_new_tokens, self.seed, self.say = default_max_new_tokens, seed, say
        self.workers: dict[str, _Worker] = {}
        self.next_id = 0
        self.replacements = 0
        self._target: int | None = None
        self._lock = threading.Lock()
        self.started = False
        self.bundles: list[dict] = []  # placement options for the first workers (a placement group's bundles)
        self.on_start = None  # called with the names of workers about to start their loops

    # -- membership -----------------------------------------------------------------------------
    def create(self, n: int) -> list[str]:
        """Create ``n`` workers (their loops start with ``start``); returns their names."""
        names = []
        for _ in range(n):
            name = f"rollout-{self.next_id}"
            placement = self.bundles[self.next_id] if self.next_id < len(self.bundles) else None
            with self._lock:  # a registration pushed meanwhile reaches it either way (set_remote_envs)
                actor = create_rollout_actor(self.model_path, self.cfg, name=name, seed=self.seed,
                                             default_max_new_tokens=self.default_max_new_tokens, placement=placement,
                                             env=self.env, remote_envs=self.remote_envs, lora=self.lora,
                                             reward=self.reward)
                self.workers[name] = _Worker(actor)
            self.next_id += 1
            names.append(name)
        return names

    def _start(self, names) -> None:
        if names and self.on_start is not None:
            self.on_start(list(names))  # e.g. make sure they can get the current weights
        for name in names:
            w = self.workers[name]
            w.loop = w.actor.run.remote(self.coordinator)

    def start(self) -> None:
        self.started = True
        self._start([n for n, w in self.workers.items() if w.loop is None])

    @property
    def live(self) -> list[str]:
        return [n for n, w in list(self.workers.items()) if not w.retiring]  # a Control thread reads it too

    @property
    def actors(self) -> list:
        return [w.actor for w in self.workers.values()]

    def where(self, timeout_s: float | None = None) -> list[dict]:
        return ActorSet({n: w.actor for n, w in self.workers.items()}).where(timeout_s)

    def loop_refs(self) -> list:
        return [w.loop for w in self.workers.values() if w.loop is not None]

    def set_remote_envs(self, specs: dict, timeout_s: float = 30.0) -> None:
        """Environments registered over Control, to every worker now and to those started later
        (a Control thread calls it). A worker that is dead or busy past ``timeout_s`` gets them
        when it is replaced (a replacement starts with ``remote_envs``)."""
        with self._lock:
            self.remote_envs = dict(specs)
            actors = self.actors
        refs = [a.set_remote_envs.remote(specs) for a in actors]
        ray.wait(refs, num_returns=len(refs), timeout=timeout_s)

    # -- scaling ---------------------------------------------------------------------------------
    def request_scale(self, n: int) -> int:
        """Ask for ``n`` live workers (thread-safe); applied at the next ``tick``.

        Bounded: more than ``rollout.max_workers``, or with ``max_workers: 0`` more than the
        live workers plus what the cluster's free resources fit now (``ray.available_resources()``
        for ``rollout.num_cpus`` / ``num_gpus`` / ``resources``; 1024 if a worker needs none),
        is refused -- ``ControlError(OUT_OF_RANGE)``, the message says the maximum and why --
        rather than capped, so a caller never believes in workers that cannot start."""
        import grpc

        from learner.control.rules import ControlError

        require(n >= 1, "rollout.num_workers", f"must be >= 1, got {n}")
        c = self.cfg
        if c.max_workers:
            limit, why = c.max_workers, f"rollout.max_workers={c.max_workers}"
        else:
            live = len(self.live)
            need = {k: float(v) for k, v in {"CPU": c.num_cpus, "GPU": c.num_gpus, **c.resources}.items() if v > 0}
            free = ray.available_resources()
            fits = min((int(free.get(k, 0.0) / v + 1e-9) for k, v in need.items()), default=1024)
            per = ", ".join(f"{k} {free.get(k, 0.0):g} free, {v:g} per worker" for k, v in need.items())
            limit = live + fits
            why = (f"{live} live + {fits} that the cluster's free resources fit ({per or 'none needed'}); "
                   "rollout.max_workers sets the maximum instead")
        if n > limit:
            raise ControlError(grpc.StatusCode.OUT_OF_RANGE,
                               f"rollout workers: {n} requested, at most {limit} ({why})")
        with self._lock:
            self._target = n
        return n

    def tick(self) -> None:
        with self._lock:
            target, self._target = self._target, None
        if target is None or not self.started:
            return
        live = self.live
        if target > len(live):
            names = self.create(target - len(live))
            self._start(names)
            self.say(f"scaled rollout workers {len(live)} -> {target}: started {', '.join(names)}")
        elif target < len(live):
            retire = live[target - len(live):]  # the newest ones
            for name in retire:
                self.workers[name].retiring = True
                ray.get(self.coordinator.retire.remote(name))
            self.say(f"scaled rollout workers {len(live)} -> {target}: retiring {', '.join(retire)}")

    # -- loops that ended ------------------------------------------------------------------------
    def owner(self, ref) -> str | None:
        return next((n for n, w in self.workers.items() if w.loop == ref), None)

    def handle_done(self, ref) -> None:
        """A worker's loop returned or failed: retire it cleanly or replace it."""
        name = self.owner(ref)
        if name is None:
            return
        w = self.workers[name]
        error = None
        try:
            ray.get(ref)
        except ray.exceptions.RayError as e:
            error = e
        if w.retiring and error is None:
            del self.workers[name]
            ray.kill(w.actor)
            return
        reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}" if error else "its loop ended"
        n = ray.get(self.coordinator.reclaim.remote(name))
        del self.workers[name]
        ray.kill(w.actor, no_restart=True)
        if w.retiring:  # died while retiring: its prompts are reclaimed, nothing to replace
            return
        if self.replacements >= self.cfg.max_replacements:
            raise FleetError(f"{name} failed ({reason}) and rollout.max_replacements="
                             f"{self.cfg.max_replacements} replacements are used up")
        self.replacements += 1
        (new,) = self.create(1)
        try:
            ray.get(self.workers[new].actor.where.remote(), timeout=self.cfg.replace_timeout_s)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayError) as e:
            ray.kill(self.workers.pop(new).actor)
            if not self.live:
                raise FleetError(f"{name} failed ({reason}); no rollout worker is alive and no replacement "
                                 f"started within rollout.replace_timeout_s={self.cfg.replace_timeout_s}s: "
                                 f"{type(e).__name__}") from None
            self.say(f"{name} failed ({reason}); a replacement did not start, continuing with {len(self.live)}")
            return
        self._start([new])
        self.say(f"{name} failed ({reason}); replaced by {new}, {n} prompts re-dispatched")

    def wait_stopped(self, timeout_s: float) -> None:
        refs = self.loop_refs()
        done, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        for ref in done:
            try:
                ray.get(ref)
            except ray.exceptions.RayError as e:
                log.warning("%s ended with an error: %s", self.owner(ref), e)
        if pending:
            log.warning("%d rollout workers did not stop within %.0fs", len(pending), timeout_s)
