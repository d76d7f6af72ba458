"""Each advantage estimator and the KL / entropy terms run end to end through the
real Ray pipeline for a few steps."""

import math

import pytest
import torch

from tests.test_pipeline import read_metrics, run_trainer, small_config


@pytest.mark.parametrize("extra", [
    ["--learner.advantage", "grpo"],
    ["--learner.advantage", "drgrpo", "--learner.loss_agg", "seq-mean-token-sum-norm"],
    ["--learner.advantage", "rloo"],
    ["--learner.advantage", "reinforce"],
    ["--learner.advantage", "reinforce++", "--learner.loss_agg", "token-mean"],
    ["--learner.advantage", "grpo", "--learner.kl_coef", "0.1", "--learner.kl_estimator", "k3",
     "--learner.entropy_coef", "0.01"],
    ["--learner.ppo_epochs", "2", "--learner.mini_batches", "2", "--learner.dual_clip", "3"],
    ["--learner.kl_coef", "0.1", "--learner.kl_in_reward", "true", "--learner.kl_estimator", "k1"],
    ["--learner.off_policy", "decoupled", "--learner.is_cap", "2", "--train.max_staleness", "1"],
    ["--learner.policy_loss", "vanilla", "--learner.off_policy", "tis", "--learner.is_level", "sequence",
     "--train.max_staleness", "1"],
], ids=["grpo", "drgrpo", "rloo", "reinforce", "reinforce++", "grpo+kl+entropy", "ppo-epochs+dual-clip",
        "kl-in-reward", "decoupled", "vanilla+tis"])
def test_algorithm_runs_end_to_end(ray_session, tiny_policy, tmp_path, extra):
    _, summary = run_trainer(small_config(tiny_policy, "--train.steps", "3", *extra), tmp_path)
    rows = read_metrics(tmp_path)
    assert summary["steps"] == 3 and summary["produced"] == summary["trained"] + summary["dropped"]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    if "--learner.entropy_coef" in extra:  # KL as a loss term + entropy: every sample contributes
        assert all(r["active_samples"] == r["samples"] for r in rows), "KL/entropy need every sample"
        assert all(r["kl"] >= 0 and r["entropy"] > 0 for r in rows)
        assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # step 1: policy == reference


def test_kl_term_pulls_towards_the_reference(tiny_policy):
    """With only the KL term (zero rewards), a perturbed policy's KL to the reference shrinks."""
    from actors.rollout.worker import RolloutConfig, RolloutWorker
    from actors.types import Prompt
    from learner.learner import Learner, LearnerConfig

    learner = Learner(tiny_policy, LearnerConfig(num_threads=1, kl_coef=1.0, lr=1e-2, max_grad_norm=0),
                      total_steps=10)
    with torch.no_grad():
        for p in learner.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    w = RolloutWorker(tiny_policy, RolloutConfig(group_size=4, max_new_tokens=4), seed=0)
    groups = w.generate([Prompt(uid=i, text=f"{i}{i}=") for i in range(4)])
    for g in groups:
        for s in g.samples:
            s.reward = 0.0

    kls = [learner.train_step(groups)["kl"] for _ in range(8)]
    assert kls[0] > 1e-3, "the perturbation should show as KL"
    assert kls[-1] < 0.5 * kls[0], kls


def test_periodic_evaluation_is_logged(ray_session, tiny_policy, tmp_path):
    _, summary = run_trainer(small_config(tiny_policy, "--train.steps", "6", "--train.eval_every", "2"), tmp_path)
    rows = read_metrics(tmp_path)
    evals = {r["step"]: r["eval_accuracy"] for r in rows if "eval_accuracy" in r}
    assert sorted(evals) == [2, 4, 6] and all(0.0 <= a <= 1.0 for a in evals.values())
    assert evals[6] == pytest.approx(summary["eval_after"])  # same weights, same greedy decoding


def test_second_ppo_epoch_sees_the_updated_policy(ray_session, tiny_policy, tmp_path):
    """On-policy data: the first pass has ratio 1; a second pass over the same batch must not."""
    cfg = small_config(tiny_policy, "--train.steps", "4", "--train.max_staleness", "0", "--learner.ppo_epochs", "2",
                       "--learner.lr", "1e-2")
    run_trainer(cfg, tmp_path)
    rows = [r for r in read_metrics(tmp_path) if r["ratio_max"] is not None]
    assert rows and any(abs(r["ratio_max"] - 1.0) > 1e-4 or r["clip_frac"] > 0 for r in rows)


def test_decoupled_equals_behaviour_ratio_when_on_policy(tiny_policy):
    """With fresh samples the proximal policy is the behaviour policy: same gradient."""
    from actors.rollout.worker import RolloutConfig, RolloutWorker
    from actors.types import Prompt
    from learner.batch import TrainBatch
    from learner.learner import Learner, LearnerConfig

    w = RolloutWorker(tiny_policy, RolloutConfig(group_size=4, max_new_tokens=4), seed=5)
    groups = w.generate([Prompt(uid=i, text=f"{i}{i}=") for i in range(3)])
    for g in groups:
        for k, s in enumerate(g.samples):
            s.reward = float(k % 2)
    learner = Learner(tiny_policy, LearnerConfig(num_threads=1, off_policy="decoupled"), total_steps=1)
    batch = TrainBatch.from_groups(groups)
    adv = learner.advantages(batch)
    grads = []
    for prox in (None, learner.proximal_logprobs(batch)):
        learner.optimizer.zero_grad(set_to_none=True)
        learner.accumulate_gradients(batch, adv, proximal=prox)
        grads.append(torch.cat([p.grad.reshape(-1) for p in learner.model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_dual_clip_and_token_weights_by_hand():
    from learner.core_algos import clipped_policy_loss

    logp = torch.tensor([[math.log(10.0), math.log(0.5)]])
    old, adv, mask = torch.zeros(1, 2), torch.tensor([-1.0]), torch.ones(1, 2)
    a, _ = clipped_policy_loss(logp, old, adv, mask, dual_clip=3.0)
    # ratio 10 (A < 0): PPO gives max(10, 1.2) = 10, dual clip bounds it at 3; ratio 0.5: max(0.5, 0.8) = 0.8
    assert float(a) == pytest.approx((3.0 + 0.8) / 2)
    weighted, _ = clipped_policy_loss(logp, old, adv, mask, token_weights=torch.tensor([[0.0, 1.0]]))
    single, _ = clipped_policy_loss(logp[:, 1:], old[:, 1:], adv, mask[:, 1:])
    assert float(weighted) == pytest.approx(float(single) / 2)  # token-mean over 2 tokens, one weighted 0


def test_overlong_penalty_and_group_filter():
    from actors.types import Group, Prompt, Sample
    from learner.batch import TrainBatch

    def group(uid, rewards, finished):
        return Group(prompt=Prompt(uid=uid, text="1="), prompt_ids=[3], samples=[
            Sample(completion_ids=[4, 1], completion_text="x", logprobs=[-1.0, -1.0], policy_version=0, reward=r,
                   finished=f) for r, f in zip(rewards, finished)])

    groups = [group(0, [1.0, 1.0], [True, False]),  # equal rewards, one cut at max_new_tokens
              group(1, [0.0, 0.0], [True, True])]  # equal, both finished
    b = TrainBatch.from_groups(groups, overlong_penalty=0.5)
    assert b.rewards.tolist() == [1.0, 0.5, 0.0, 0.0]
    f = TrainBatch.from_groups(groups, overlong_penalty=0.5, filter_equal_groups=True)
    assert len(f) == 2 and f.rewards.tolist() == [1.0, 0.5]  # the penalty made group 0 informative


def test_group_filter_runs_end_to_end_with_exact_accounting(ray_session, tiny_policy, tmp_path):
    cfg = small_config(tiny_policy, "--train.steps", "4", "--learner.filter_equal_groups", "true",
                       "--learner.overlong_penalty", "0.1")
    _, summary = run_trainer(cfg, tmp_path)
    rows = read_metrics(tmp_path)
    assert summary["produced"] == summary["trained"] + summary["dropped"]
    assert summary["trained"] == sum(r["samples"] for r in rows)
    assert all("filtered_groups" in r for r in rows)


def test_kl_reward_penalty_lowers_rewards_of_a_drifted_policy(tiny_policy):
    from actors.rollout.worker import RolloutConfig, RolloutWorker
    from actors.types import Prompt
    from learner.batch import TrainBatch
    from learner.learner import Learner, LearnerConfig

    learner = Learner(tiny_policy, LearnerConfig(num_threads=1, kl_coef=1.0, kl_in_reward=True, kl_estimator="k3"),
                      total_steps=1)
    w = RolloutWorker(tiny_policy, RolloutConfig(group_size=2, max_new_tokens=4), seed=0)
    batch = TrainBatch.from_groups([g for g in w.generate([Prompt(uid=0, text="12=")]) if
                                    [setattr(s, "reward", 1.0) for s in g.samples]])
    assert torch.allclose(learner.sequence_kl(batch), torch.zeros(2), atol=1e-6)  # policy == reference
    with torch.no_grad():
        for p in learner.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert bool((learner.sequence_kl(batch) > 0).all())  # k3 >= 0, and > 0 once the policy moved
