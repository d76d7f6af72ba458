"""The training loop's steps: sample -> update -> sync weights, and the loop around them.

``StepLoop`` is the part of ``Trainer`` (``trainer.py``) that runs steps; it uses
the actors and reports ``Trainer.setup`` built. A step is three visible phases:

1. **sample** waits until a batch of scored groups is ready (its object ref:
   the driver never fetches the groups), watching the rollout loops and the
   reward workers meanwhile;
2. **update** queues one optimizer step on the learner;
3. **sync weights** queues the learner's publish and the coordinator's commit
   behind it (``weight_sync.WeightSync.submit``).

With ``max_staleness > 0`` the driver then samples and queues step n + 1
*before* it reads step n's result (``InFlight``): the learner goes from one
step to the next without waiting for the driver. A step with an evaluation or
a checkpoint is read at once (both need the learner at exactly that step), and
every way out of the loop reads the step in flight first. A learner whose step
or publish failed refuses what was queued behind it (``LearnerActor``), so a
failure ends the run at that step.
"""

from __future__ import annotations

import dataclasses
import time

import ray

from actors.runtime.coordinator import PromptsExhausted, SampleTimeout
from actors.weights.collective import CollectiveConfigError
from learner.driver import ending
from learner.driver.errors import RunFailed, StopRequested
from learner.driver.fleet import FleetError


@dataclasses.dataclass
class InFlight:
    """A step whose update and publish are queued: ``refs`` (``WeightSync.submit``'s) not read yet."""

    step: int
    """Its number (1-based): ``trainer.step`` once it is read."""
    refs: tuple
    t_sample: float
    """When its sampling started."""
    t_ready: float
    """When its batch was ready and the update queued."""

    @property
    def counters(self):
        return self.refs[1]


class StepLoop:
    """Mixed into ``Trainer``: the loop of steps (``run_steps``) and its three phases."""

    submitted = 0
    """Steps queued on the learner (``step``: steps read back)."""
    in_flight: InFlight | None = None
    """A step queued and not yet read."""

    def _request_batch(self, step: int):
        return self.coordinator.get_batch_ref.remote(step, self.cfg.train.sample_timeout_s)

    def sample(self):
        """Phase 1: wait until a batch of scored groups is ready; fail loudly if a worker died.

        Returns the batch's object ref: the driver never fetches the groups, the
        learner takes them from the object store (one hop and one pickling less
        per step). The coordinator raises if no group arrives for
        ``train.sample_timeout_s`` (a slow but live pipeline is not an error).
        With ``max_staleness > 0`` the next batch is requested as soon as this
        one is ready, so it is assembled while the learner updates.
        """
        ref, self.prefetched = self.prefetched or self._request_batch(self.submitted), None
        self.waiting = ref  # until it returns: stop_rollouts must let it finish before draining
        while True:
            self.rollouts.tick()  # apply a pending scale request
            self.supervisor.tick()  # pause/disable around unhealthy registered reward models
            watch = self.supervisor.refs()
            queued = [self.in_flight.counters] if self.in_flight is not None else []
            ready, _ = ray.wait([ref] + queued + self.rollouts.loop_refs() + watch, num_returns=1, timeout=1.0)
            if not ready:
                if self.stop_requested.is_set():
                    raise StopRequested()
                continue
            if ready[0] == ref or (ready[0] in queued and ray.wait([ref], timeout=0)[0]):
                return self._take_batch(ref)  # a ready batch first: its step is queued before the last is read
            if ready[0] in queued:  # the queued step is done (or failed: raised here, not after the batch)
                self.finish_in_flight()
                continue
            if ready[0] in watch:
                self.supervisor.handle(ready[0])  # a reward worker is replaced; learner/coordinator: RunFailed
                continue
            self._loop_ended(ready[0])

    def _take_batch(self, ref):
        try:
            [batch] = ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            cause = e.as_instanceof_cause()
            if isinstance(cause, SampleTimeout):
                raise RunFailed(str(cause)) from None
            if isinstance(cause, PromptsExhausted):
                raise PromptsExhausted(str(cause).strip().splitlines()[-1]) from None
            raise
        except ray.exceptions.RayActorError as e:
            raise ending.failure_from(self, e, "the batch request") from None
        self.waiting = None
        if self.cfg.train.max_staleness > 0 and self.submitted + 1 < self.steps:
            self.prefetched = self._request_batch(self.submitted + 1)
        return batch

    def _loop_ended(self, ref) -> None:
        """A rollout loop ended: a retired worker leaves, a lost one is replaced (unless it
        ended because the coordinator died: that is named instead)."""
        try:
            ray.get(ref, timeout=0)
        except ray.exceptions.RayError:
            self.supervisor.check_core(timeout_s=2.0)
        try:
            self.rollouts.handle_done(ref)
        except FleetError as e:
            raise RunFailed(str(e), component="rollout") from None

    def update(self, batch):
        """Phase 2: one optimizer step on the learner. Returns the ref of its metrics:
        the driver does not wait here, the sync is queued right behind it."""
        w = self.cfg.watch
        preview = w.samples_per_write if w.samples_every and (self.submitted + 1) % w.samples_every == 0 else 0
        return self.learner.train_step.remote(batch, preview)

    def sync_weights(self, update) -> tuple:
        """Phase 3: queue the publish of the weights after ``update`` (None: the initial
        publish) and the commit of the step's groups; ``complete`` reads the result."""
        n = self.cfg.train.prompts_per_step if update is not None else 0  # get_batch hands out exactly this many
        members = {name: w.actor for name, w in self.rollouts.workers.items()}
        try:
            return self.weights.submit(update, commit_groups=n, members=members,
                                       version=self.submitted + 1 if update is not None else None)
        except CollectiveConfigError as e:
            raise RunFailed(str(e)) from None
        except ray.exceptions.RayError as e:
            raise ending.failure_from(self, e, f"learner step {self.submitted + 1} failed") from None

    def complete(self, queued: tuple) -> tuple[dict | None, int]:
        """The metrics of a step ``sync_weights`` queued, and the new ``policy_version``
        (steps are read in order: the step read is ``self.step + 1``)."""
        try:
            return self.weights.collect(*queued)
        except ray.exceptions.RayError as e:
            raise ending.failure_from(self, e, f"learner step {self.step + 1} failed") from None

    def run_steps(self, t_rl: float) -> str:
        """sample -> update -> sync weights, until ``train.steps``, ``train.max_wall_s`` or a
        stop request; returns "finished" or "stopped". A step is left in flight (its update
        and publish queued, its result not read) while the next batch is sampled and queued
        (``overlaps``); every way out of here reads it first."""
        self.submitted = self.step
        try:
            return self._run_steps(t_rl)  # every return reads the step in flight first
        except Exception:
            queued, self.in_flight = self.in_flight, None
            if queued is not None and queued.step == self.step + 1:  # the next step in order (not one past a gap)
                try:  # a step already queued still counts if it can be read; the first failure is the run's
                    self.read_step(queued)
                except Exception:  # noqa: BLE001 - e.g. the same dead learner: not what ended the run
                    pass
            raise

    def _run_steps(self, t_rl: float) -> str:
        cfg = self.cfg
        while self.submitted < self.steps:
            if self.stop_requested.is_set():
                return self._stop("stop requested")
            if cfg.train.max_wall_s and time.perf_counter() - t_rl > cfg.train.max_wall_s:
                self._stop(f"train.max_wall_s={cfg.train.max_wall_s} reached")
                return "finished"
            t0 = time.perf_counter()
            try:
                batch = self.sample()
            except StopRequested:
                return self._stop("stop requested")
            except PromptsExhausted as e:
                self._stop(str(e))
                return "finished"
            queued = InFlight(self.submitted + 1, self.sync_weights(self.update(batch)), t0, time.perf_counter())
            self.submitted += 1
            previous, self.in_flight = self.in_flight, queued
            if previous is not None:
                self.read_step(previous)  # read while this one runs
            if not self.overlaps(queued.step) and self.finish_in_flight() == "stopped":
                self.say(f"stopping at step {self.step}: stop requested during evaluation")
                return "stopped"
        return "finished"

    def _stop(self, why: str) -> str:
        self.finish_in_flight()
        self.say(f"stopping at step {self.step}: {why}")
        return "stopped"

    def overlaps(self, step: int) -> bool:
        """May step ``step`` stay in flight while the next is sampled? Only when sampling runs
        ahead anyway (``max_staleness`` > 0), the sync is only queued, and the step has no
        evaluation or checkpoint (those need the learner at exactly this step)."""
        t = self.cfg.train
        return (t.max_staleness > 0 and self.weights.queues and step < self.steps
                and not (t.eval_every and step % t.eval_every == 0)
                and not (t.checkpoint_every and step % t.checkpoint_every == 0))

    def finish_in_flight(self) -> str | None:
        """Read the step in flight, if any (``read_step``)."""
        queued, self.in_flight = self.in_flight, None
        return self.read_step(queued) if queued is not None else None

    def read_step(self, queued: InFlight) -> str | None:
        """A queued step's result: its row, its evaluation and checkpoint when due. Returns
        "stopped" when a stop request came during its evaluation."""
        m, version = self.complete(queued.refs)
        t3 = time.perf_counter()
        self.step = queued.step
        preview = m.pop("preview", None)
        if preview:
            self.report.samples(self.step, preview)
        cfg, stopped = self.cfg, None
        if cfg.train.eval_every and self.step % cfg.train.eval_every == 0:
            try:
                m["eval_accuracy"] = self.evaluate("during")  # the weights of this step (or newer)
            except StopRequested:  # the step itself is done: its row and checkpoint are still written
                stopped = "stopped"
        self.report.step(self.step, version, m, self.counters, elapsed_s=t3 - self.t_rl,
                         sample_s=queued.t_ready - queued.t_sample, update_sync_s=t3 - queued.t_ready)
        if cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0:
            self.save_checkpoint()
        return stopped

