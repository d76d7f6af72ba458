"""Where a rollout worker's groups go to be scored.

Real Ray actors: a coordinator with the built-in task, a reward actor that puts
the groups into the coordinator and then dies (``os._exit``, the process is
gone), and a healthy one. ``RewardDispatch`` must re-send the groups to the
healthy actor, and the coordinator must count the second put once. With
``reward.colocate`` a real rollout actor scores its groups itself, until
run-time reward models are registered.
"""

from __future__ import annotations

import os

import ray

from actors.reward.worker import RewardConfig
from actors.rollout.worker import RolloutConfig
from actors.runtime.actors import create_coordinator
from actors.runtime.rollout_actor import create_rollout_actor
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
        prompts = ray.get(coordinator.acquire.remote("rollout-0", 5.0)).prompts
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


def test_colocated_scoring_runs_in_the_rollout_worker_until_models_are_registered(ray_session, tiny_policy):
    coordinator = create_coordinator(TaskPrompts("reverse", TaskConfig().task_kwargs()), groups_per_step=2,
                                     prompts_per_request=2, max_staleness=0, total_groups=100)
    reward_actor = Scorer.remote(0.5, die=False)  # stands in for a reward worker holding registered models
    rollout = create_rollout_actor(tiny_policy, RolloutConfig(num_cpus=0.05, group_size=3, max_new_tokens=4),
                                   name="rollout-0", seed=0, default_max_new_tokens=4,
                                   reward=RewardConfig(functions=["tests.rewards:pid_reward"], colocate=True))
    try:
        ray.get(coordinator.set_reward_actors.remote([reward_actor]))
        pid = ray.get(rollout.where.remote())["pid"]
        loop = rollout.run.remote(coordinator)
        local = ray.get(coordinator.get_batch.remote(0, 60.0))
        assert {s.reward for g in local for s in g.samples} == {float(pid)}, "not scored in the rollout worker"
        ray.get(coordinator.set_models_registered.remote(True))
        ray.get(coordinator.publish.remote(new_weights(tiny_policy), commit_groups=2))  # opens the gate (on-policy)
        remote = ray.get(coordinator.get_batch.remote(1, 60.0))
        assert {s.reward for g in remote for s in g.samples} == {0.5}, "registered models were bypassed"
        assert {s.policy_version for g in remote for s in g.samples} == {1}, "the weights that came with the prompts"
        ray.get(coordinator.stop.remote())
        assert ray.get(loop, timeout=60)["scored_here"] == 1
    finally:
        for a in (coordinator, reward_actor, rollout):
            ray.kill(a)


def new_weights(policy: str):
    """Version 1 of ``policy`` (its own weights), published to the object store."""
    from transformers import AutoModelForCausalLM

    from actors.runtime import object_store
    from actors.weights.flat import FlatParams
    from actors.weights.object_store import WeightPublisher

    publisher = WeightPublisher(FlatParams(AutoModelForCausalLM.from_pretrained(policy)))
    publisher.bump()
    return publisher.publish(object_store.put)
