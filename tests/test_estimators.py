"""Estimators against exact quantities computed by enumeration (a K-armed bandit)."""

import math

import pytest
import torch

from learner.core_algos import (batch_normalized_advantages, dual_clip_policy_loss, entropy_from_logits,
                                group_advantages, kl_estimate, reinforce_baseline_advantages, rloo_advantages,
                                truncated_importance_weights)

REWARDS = torch.tensor([1.0, 0.0, 0.3, 0.8, 0.0])
THETA = torch.tensor([0.2, -0.4, 0.1, 0.5, 0.0])


def exact_gradient():
    """d E_pi[r] / d theta for pi = softmax(theta): pi * (r - E[r])."""
    pi = torch.softmax(THETA, 0)
    return pi * (REWARDS - (pi * REWARDS).sum())


def mc_gradient(advantage_fn, groups=4000, n=8, seed=0):
    """Mean of A_i * grad log pi(a_i) over groups of n samples."""
    g = torch.Generator().manual_seed(seed)
    pi = torch.softmax(THETA, 0)
    actions = torch.multinomial(pi.expand(groups, -1), n, replacement=True, generator=g).reshape(-1)
    group_index = torch.arange(groups).repeat_interleave(n)
    adv = advantage_fn(REWARDS[actions], group_index)
    grad_logp = torch.nn.functional.one_hot(actions, len(pi)).float() - pi  # d log pi(a) / d theta
    return (adv.unsqueeze(-1) * grad_logp).mean(0)


def cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def test_rloo_is_unbiased():
    est, exact = mc_gradient(rloo_advantages), exact_gradient()
    assert cos(est, exact) > 0.995 and rel_err(est, exact) < 0.05


def test_grpo_mean_baseline_is_shrunk_by_n_minus_1_over_n():
    n = 8
    est = mc_gradient(lambda r, g: group_advantages(r, g, norm_by_std=False), n=n)
    assert cos(est, exact_gradient()) > 0.995
    assert rel_err(est, exact_gradient() * (n - 1) / n) < 0.05  # Dr.GRPO's known (n-1)/n factor


def test_grpo_with_std_points_the_same_way():
    assert cos(mc_gradient(lambda r, g: group_advantages(r, g)), exact_gradient()) > 0.98


def test_reinforce_with_a_fixed_baseline_is_unbiased_and_the_baseline_moves():
    b = float((torch.softmax(THETA, 0) * REWARDS).sum())
    est = mc_gradient(lambda r, g: reinforce_baseline_advantages(r, b)[0])
    assert rel_err(est, exact_gradient()) < 0.06
    _, new_b = reinforce_baseline_advantages(torch.tensor([1.0, 1.0]), 0.0, decay=0.9)
    assert new_b == pytest.approx(0.1)


def test_batch_normalized_advantages():
    a = batch_normalized_advantages(torch.tensor([1.0, 2.0, 3.0]), eps=0.0)
    assert a.tolist() == pytest.approx([-1.0, 0.0, 1.0])
    assert batch_normalized_advantages(torch.tensor([2.0, 2.0])).tolist() == [0.0, 0.0]
    assert cos(mc_gradient(lambda r, g: batch_normalized_advantages(r)), exact_gradient()) > 0.98


@pytest.mark.parametrize("kind, unbiased", [("k1", True), ("k3", True), ("k2", False)])
def test_kl_estimators_match_exact_kl(kind, unbiased):
    p = torch.softmax(torch.tensor([0.5, 0.1, -0.3, 0.2]), 0)
    q = torch.softmax(torch.tensor([0.3, 0.2, -0.1, 0.0]), 0)
    exact = float((p * (p.log() - q.log())).sum())
    g = torch.Generator().manual_seed(1)
    a = torch.multinomial(p, 400_000, replacement=True, generator=g)
    est = float(kl_estimate(p.log()[a], q.log()[a], kind).mean())
    if unbiased:
        assert est == pytest.approx(exact, rel=0.05)
    else:  # k2 is biased but close for nearby distributions
        assert est == pytest.approx(exact, rel=0.3)
    if kind == "k3":
        assert float(kl_estimate(p.log()[a], q.log()[a], "k3").min()) >= 0
    with pytest.raises(ValueError):
        kl_estimate(p, q, "k9")


def test_entropy_and_truncated_weights():
    assert float(entropy_from_logits(torch.zeros(1, 1, 4))) == pytest.approx(math.log(4))
    w = truncated_importance_weights(torch.tensor([0.0, 2.0]), torch.tensor([0.0, 0.0]), cap=2.0)
    assert w.tolist() == pytest.approx([1.0, 2.0]) and not w.requires_grad


def test_dual_clip_bounds_negative_advantage_loss():
    logp = torch.tensor([[math.log(10.0)]], requires_grad=True)  # ratio 10, far above the clip range
    loss = dual_clip_policy_loss(logp, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1), dual_clip=3.0)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(3.0) and float(logp.grad) == 0.0  # bounded at -A * c, no gradient
    logp2 = torch.tensor([[math.log(2.0)]], requires_grad=True)  # ratio 2 < c: the usual PPO loss
    loss2 = dual_clip_policy_loss(logp2, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1), dual_clip=3.0)
    assert float(loss2.detach()) == pytest.approx(2.0)
