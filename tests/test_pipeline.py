"""The whole actor-learner pipeline on a real local Ray instance."""

from __future__ import annotations

import io
import json

import pytest
import ray

from actors.rollout.worker import RolloutConfig, RolloutWorker
from actors.runtime import object_store
from actors.types import Prompt
from learner.config import ConfigError, load_config
from learner.driver.trainer import RunFailed, Trainer


def small_config(policy: str, *extra: str):
    """A few steps of 4 prompts x 4 samples on one rollout worker (each worker costs a test run
    ~2 s of start-up on 2 cores); tests about several workers pass ``--rollout.num_workers``."""
    return load_config(None, [
        "--model.path", policy, "--reward.functions", "['tests.rewards:digit_reward']", "--train.steps", "6", "--train.prompts_per_step", "4",
        "--rollout.group_size", "4", "--rollout.prompts_per_request", "2", "--rollout.max_new_tokens", "5",
        "--rollout.num_workers", "1", "--task.eval_size", "16", "--learner.num_threads", "1", "--train.sample_timeout_s", "30",
        "--watch.plot", "false", "--watch.report_to", "[jsonl]", *extra])  # watching: tests/test_watch.py


def run_trainer(cfg, tmp_path, trainer_cls=Trainer):
    t = trainer_cls(cfg, tmp_path / "run", out=io.StringIO(), progress=False)
    try:
        summary = t.train()
        return t, summary
    finally:
        t.shutdown()


def read_metrics(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


def assert_workers_end_on_the_learners_weights(t: Trainer, final: int) -> None:
    """Every surviving rollout worker's loop ended on version ``final``, holding the
    learner's weights bit for bit (the actors are alive until ``shutdown``)."""
    actors = t.rollouts.actors
    assert actors, "no rollout worker survived"
    loops = ray.get(t.rollouts.loop_refs())
    assert [r["policy_version"] for r in loops] == [final] * len(actors)
    assert ray.get([a.policy_version.remote() for a in actors]) == [final] * len(actors)
    learner_digest = ray.get(t.learner.weights_digest.remote())
    assert ray.get([a.weights_digest.remote() for a in actors]) == [learner_digest] * len(actors)


def test_weights_reach_rollout_workers_and_on_policy_steps_train_only_the_current_version(ray_session, tiny_policy,
                                                                                           tmp_path):
    # the learner as 2 FSDP2 ranks (learner.num_workers): rollout workers must see no difference
    cfg = small_config(tiny_policy, "--train.max_staleness", "0", "--learner.lr", "1e-2", "--rollout.num_workers", "2",
                       "--learner.num_workers", "2", "--learner.num_cpus", "0.2")
    t = Trainer(cfg, tmp_path / "run", out=io.StringIO(), progress=False)
    try:
        summary = t.train()
        assert len(summary["peak_rss_mib"]["learner_ranks"]) == 2
        rows = read_metrics(tmp_path)
        assert len(rows) == summary["steps"] == 6
        assert any(row["ratio_max"] is not None for row in rows), "no step backpropagated anything"
        for i, row in enumerate(rows):  # step i+1 trains on samples of exactly version i
            assert row["behaviour_versions"] == [i]
            assert row["staleness_max"] == 0
            if row["ratio_max"] is not None:  # None: every group had equal rewards, nothing was backpropagated
                assert row["ratio_max"] == pytest.approx(1.0, abs=1e-3)  # on-policy: no importance weight
        assert any(row["ratio_max"] is not None for row in rows), "no step backpropagated: the ratio went unchecked"
        assert summary["produced"] == summary["trained"] + summary["dropped"]
        assert summary["trained"] == sum(r["samples"] for r in rows)
        final = summary["final_policy_version"]
        assert final == summary["steps"] == 6
        assert len(t.rollouts.actors) == cfg.rollout.num_workers == 2
        assert_workers_end_on_the_learners_weights(t, final)
        # generated log-probs change: the same greedy completion scored by version 0 and by the final
        # version (fetched from the object store while the learner that put it is alive)
        payload = ray.get(t.coordinator.latest_weights.remote())
        worker = RolloutWorker(tiny_policy, RolloutConfig(group_size=1, temperature=0.0, max_new_tokens=5),
                               fetch_weights=object_store.fetch)
        prompt = [Prompt(uid=0, text="1234=")]
        (before,) = worker.generate(prompt)
        assert worker.load_weights(payload) and worker.policy_version == final
        (after,) = worker.generate(prompt)
        assert after.samples[0].policy_version == final
        assert after.samples[0].logprobs != pytest.approx(before.samples[0].logprobs, abs=1e-3)
    finally:
        t.shutdown()


class RecordingOverlap(Trainer):
    """Records, for each step read back, how many steps were queued on the learner then; takes
    each batch only once it is ready, so a step in flight is read after the next is queued
    whenever the driver may queue it (a batch that is ready wins over a step that is done)."""

    def sample(self):
        if self.prefetched is not None:
            ray.wait([self.prefetched], timeout=60)
        return super().sample()

    def complete(self, queued):
        self.queued_when_read = getattr(self, "queued_when_read", []) + [self.submitted - self.step]
        return super().complete(queued)


def test_async_mode_respects_staleness_bound_and_nan_rewards_are_excluded(ray_session, tiny_policy, tmp_path):
    # rewards scored inside the rollout worker (reward.colocate): exclusions counted all the same
    cfg = small_config(tiny_policy, "--train.max_staleness", "1", "--train.steps", "10", "--reward.colocate", "true",
                       "--train.checkpoint_every", "5",
                       "--reward.functions", "['tests.rewards:digit_reward', 'tests.rewards:flaky_reward']")
    t, summary = run_trainer(cfg, tmp_path, RecordingOverlap)
    # the driver queued step n + 1 before reading step n, except at the checkpoint steps (5) and the last
    assert 2 in t.queued_when_read, t.queued_when_read
    assert len(t.queued_when_read) == 11 and t.queued_when_read[0] == 0, t.queued_when_read  # [0]: the first publish
    assert t.queued_when_read[5] == t.queued_when_read[10] == 1, t.queued_when_read  # read before the next was queued
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert all(0 <= r["staleness_max"] <= 1 for r in rows)
    assert any(r["staleness_max"] == 1 for r in rows), "async mode never overlapped generation with updates"
    assert summary["produced"] == summary["trained"] + summary["dropped"]
    assert summary["trained"] == sum(r["samples"] for r in rows)
    assert summary["trained"] > 0 and summary["produced"] >= summary["trained"]
    assert summary["dropped_by_reason"].get("reward_nonfinite", 0) > 0
    assert all(r["loss"] == r["loss"] for r in rows), "a NaN reward leaked into the loss"


def test_a_learner_refuses_what_was_queued_behind_a_failed_step(ray_session, tiny_policy, tmp_path):
    """The driver queues step n + 1 before it reads step n: after a failed step, neither its
    publish nor the next step may run (the run ends at the failure; a checkpoint must match)."""
    from learner.actor import create_learner
    from learner.learner import LearnerConfig

    learner = create_learner(tiny_policy, LearnerConfig(num_threads=1, num_cpus=0.1), total_steps=10)
    try:
        bad = learner.train_step.remote(ray.put("not a list of groups"))
        publish = learner.publish_weights.remote()
        following = learner.train_step.remote(ray.put([]))
        with pytest.raises(ray.exceptions.RayTaskError, match="AttributeError"):
            ray.get(bad)
        with pytest.raises(ray.exceptions.RayTaskError, match="publish_weights refused: step 1 failed"):
            ray.get(publish)
        with pytest.raises(ray.exceptions.RayTaskError, match="train_step refused: step 1 failed"):
            ray.get(following)
        assert ray.get(learner.version.remote()) == 0
        with pytest.raises(ray.exceptions.RayTaskError, match="checkpoint of step 1 asked of a learner at version 0"):
            ray.get(learner.save_state.remote(str(tmp_path / "ckpt"), 1))
    finally:
        ray.kill(learner)
    # a step that never ran (its batch could not be fetched): its publish must not go out as that version
    learner = create_learner(tiny_policy, LearnerConfig(num_threads=1, num_cpus=0.1), total_steps=10)
    try:
        publish = learner.publish_weights.remote(expect_version=1)
        following = learner.train_step.remote(ray.put([]))
        with pytest.raises(ray.exceptions.RayTaskError, match="publish of version 1 asked of a learner at version 0"):
            ray.get(publish)
        with pytest.raises(ray.exceptions.RayTaskError, match="train_step refused: publish of version 1 failed"):
            ray.get(following)
    finally:
        ray.kill(learner)


def test_reward_that_always_fails_ends_the_run_with_a_clear_error(ray_session, tiny_policy, tmp_path):
    cfg = small_config(tiny_policy, "--reward.functions", "['tests.rewards:always_raises']",
                       "--train.sample_timeout_s", "4")
    t = Trainer(cfg, tmp_path / "run", out=io.StringIO(), progress=False)
    try:
        digest_before = None
        with pytest.raises(RunFailed, match="reward_error") as e:
            t.setup()
            digest_before = ray.get(t.learner.weights_digest.remote())
            t.start_rollouts()
            t.sample()
        assert "reward service unavailable" in str(e.value)
        assert ray.get(t.learner.weights_digest.remote()) == digest_before  # nothing was trained
        stats = t.stop_rollouts()
        assert stats["trained"] == 0 and stats["produced"] == stats["dropped"] > 0
    finally:
        t.shutdown()


def test_missing_model_path_is_a_config_error(ray_session, tmp_path):
    cfg = small_config(str(tmp_path / "no-such-model"))
    with pytest.raises(ConfigError, match="model.path"):
        Trainer(cfg, tmp_path / "run", out=io.StringIO(), progress=False).setup()


def test_unloadable_reward_function_is_a_config_error(ray_session, tiny_policy, tmp_path):
    cfg = small_config(tiny_policy, "--reward.functions", "['tests.test_pipeline:no_such_fn']")
    with pytest.raises(ConfigError, match="reward.functions"):
        Trainer(cfg, tmp_path / "run", out=io.StringIO(), progress=False).setup()
