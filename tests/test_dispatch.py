"""A rollout worker's reward calls survive the death of the reward actor serving them.

Real Ray actors: a coordinator with the built-in task, a reward actor that puts
the groups into the coordinator and then dies (``os._exit``, the process is
gone), and a healthy one. ``RewardDispatch`` must re-send the groups to the
healthy actor, and the coordinator must count the second put once.
"""

from __future__ import annotations

import os

import ray

from actors.runtime.actors import create_coordinator
from actors.tasks.registry import TaskPrompts
from actors.runtime.rollout_loop import RewardDispatch
from actors.types import Group, Sample
from learner.config import TaskConfig


@ray.remote
class Scorer:
    """Scores every sample ``reward`` and puts the groups; with ``die``, exits right after its put
    landed (the caller sees ActorDiedError)."""

    def __init__(self, reward: float, die: bool):
        self.reward, self.die = reward, die

    def score_and_put(self, groups, coordinator):
        for g in groups:
            for s in g.samples:
                s.reward = self.reward
        ray.get(coordinator.put.remote(groups))
        if self.die:
            os._exit(1)


def test_groups_of_a_dead_reward_actor_are_resent_and_counted_once(ray_session):
    coordinator = create_coordinator(TaskPrompts("reverse", TaskConfig().task_kwargs()), groups_per_step=2, prompts_per_request=2,
                                     max_staleness=0, total_groups=100)
    dying, healthy = Scorer.remote(1.0, die=True), Scorer.remote(0.5, die=False)
    try:
        ray.get(coordinator.set_reward_actors.remote([dying, healthy]))
        prompts, _ = ray.get(coordinator.acquire.remote("rollout-0", 5.0))
        groups = [Group(prompt=p, prompt_ids=[1], worker="rollout-0",
                        samples=[Sample(completion_ids=[1], completion_text="1", logprobs=[-1.0], policy_version=0)
                                 for _ in range(3)]) for p in prompts]
        dispatch = RewardDispatch(coordinator, resend_timeout_s=30)
        dispatch.submit(groups)  # the first call goes to `dying`
        dispatch.wait()
        assert dispatch.resent == 1
        s = ray.get(coordinator.stats.remote())
        assert s["produced"] == 12 and s["dropped_by_reason"] == {"duplicate": 6} and s["buffered_groups"] == 2
        batch = ray.get(coordinator.get_batch.remote(0, 5.0))
        assert [smp.reward for g in batch for smp in g.samples] == [1.0] * 6  # the first put is the one kept
    finally:
        for a in (coordinator, dying, healthy):
            ray.kill(a)
