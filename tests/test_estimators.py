"""Estimators against exact quantities computed by enumeration: a K-armed bandit
and a 2-step toy problem (a categorical first token, then a categorical second
token conditioned on the first)."""

import math

import pytest
import torch

from learner.core_algos import (batch_normalized_advantages, clipped_policy_loss, entropy_from_logits,
                                group_advantages, kl_estimate, policy_gradient_loss, reinforce_baseline_advantages,
                                rloo_advantages, truncated_importance_weights)

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
    loss, _ = clipped_policy_loss(logp, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1), dual_clip=3.0)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(3.0) and float(logp.grad) == 0.0  # bounded at -A * c, no gradient
    logp2 = torch.tensor([[math.log(2.0)]], requires_grad=True)  # ratio 2 < c: the usual PPO loss
    loss2, _ = clipped_policy_loss(logp2, torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1), dual_clip=3.0)
    assert float(loss2.detach()) == pytest.approx(2.0)


# ------------------------------------------------------------------------------------------------
# A 2-step toy problem: a1 ~ softmax(theta1), a2 ~ softmax(theta2[a1]), reward R[a1, a2].
# The Monte-Carlo gradient goes through the same loss functions the learner uses,
# on [B, 2] per-token log-probs, and is compared with the exact gradient of E[R].
# ------------------------------------------------------------------------------------------------
K = 3
R2 = torch.tensor([[1.0, 0.0, 0.2], [0.0, 0.7, 0.0], [0.4, 0.0, 1.0]])
THETA1 = torch.tensor([0.3, -0.2, 0.0])
THETA2 = torch.tensor([[0.5, 0.0, -0.5], [0.0, 0.4, 0.1], [-0.3, 0.2, 0.6]])


def two_step_exact_gradient(t1=THETA1, t2=THETA2):
    """Gradient of sum_{a1,a2} p(a1) p(a2|a1) R[a1,a2] by enumeration (autograd)."""
    t1, t2 = t1.clone().requires_grad_(), t2.clone().requires_grad_()
    joint = torch.softmax(t1, 0).unsqueeze(-1) * torch.softmax(t2, -1)
    (joint * R2).sum().backward()
    return torch.cat([t1.grad, t2.grad.reshape(-1)])


def two_step_mc_gradient(advantage_fn, loss="clip", groups=3000, n=8, seed=0, behaviour=(THETA1, THETA2), **kw):
    """Samples from ``behaviour`` logits; returns -grad of the learner's loss w.r.t. (theta1, theta2)."""
    g = torch.Generator().manual_seed(seed)
    b1, b2 = behaviour
    a1 = torch.multinomial(torch.softmax(b1, 0).expand(groups * n, -1), 1, generator=g).squeeze(-1)
    a2 = torch.multinomial(torch.softmax(b2, -1)[a1], 1, generator=g).squeeze(-1)
    beh = torch.stack([torch.log_softmax(b1, 0)[a1], torch.log_softmax(b2, -1)[a1, a2]], -1)  # [B, 2]
    t1, t2 = THETA1.clone().requires_grad_(), THETA2.clone().requires_grad_()
    logp = torch.stack([torch.log_softmax(t1, 0)[a1], torch.log_softmax(t2, -1)[a1, a2]], -1)  # [B, 2]
    adv = advantage_fn(R2[a1, a2], torch.arange(groups).repeat_interleave(n))
    mask = torch.ones_like(logp)
    if loss == "clip":  # ratio against the behaviour log-probs
        out, _ = clipped_policy_loss(logp, beh, adv, mask, loss_agg="seq-mean-token-sum", clip_low=1e9, clip_high=1e9)
    else:
        out, _ = policy_gradient_loss(logp, beh, adv, mask, loss_agg="seq-mean-token-sum", **kw)
    out.backward()
    return -torch.cat([t1.grad, t2.grad.reshape(-1)])


@pytest.mark.parametrize("loss", ["clip", "vanilla"])
def test_two_step_rloo_matches_the_exact_gradient(loss):
    est, exact = two_step_mc_gradient(rloo_advantages, loss=loss), two_step_exact_gradient()
    assert cos(est, exact) > 0.99 and rel_err(est, exact) < 0.08


def test_two_step_grpo_and_reinforce():
    n, exact = 8, two_step_exact_gradient()
    drgrpo = two_step_mc_gradient(lambda r, g: group_advantages(r, g, norm_by_std=False), n=n)
    assert cos(drgrpo, exact) > 0.99 and rel_err(drgrpo, exact * (n - 1) / n) < 0.08
    b = 0.5  # any fixed baseline leaves REINFORCE unbiased
    est = two_step_mc_gradient(lambda r, g: reinforce_baseline_advantages(r, b)[0])
    assert cos(est, exact) > 0.98 and rel_err(est, exact) < 0.1


def test_two_step_truncated_is_corrects_stale_samples():
    """Samples from an older policy: without correction the estimate is biased;
    sequence-level IS (cap not reached) recovers the exact gradient. Per-token
    weights (what PPO-style token ratios do) are only an approximation here: the
    first token's advantage depends on a second token the stale policy drew."""
    stale = (THETA1 + torch.tensor([0.8, -0.6, 0.0]), THETA2 - 0.7 * torch.eye(K))
    exact = two_step_exact_gradient()
    fn = rloo_advantages
    plain = two_step_mc_gradient(fn, loss="vanilla", behaviour=stale, groups=6000)
    seq = two_step_mc_gradient(fn, loss="vanilla", behaviour=stale, groups=6000, is_cap=1e6, is_level="sequence")
    tok = two_step_mc_gradient(fn, loss="vanilla", behaviour=stale, groups=6000, is_cap=1e6, is_level="token")
    assert rel_err(plain, exact) > 0.25, "the stale distribution must visibly bias the uncorrected estimate"
    assert cos(seq, exact) > 0.98 and rel_err(seq, exact) < 0.1
    assert rel_err(seq, exact) < 0.5 * rel_err(tok, exact)
    w = truncated_importance_weights(torch.tensor([[0.0, 3.0]]), torch.zeros(1, 2), cap=5.0,
                                     mask=torch.tensor([[1.0, 1.0]]), level="sequence")
    assert w.tolist() == [[5.0, 5.0]]  # exp(3) = 20 over the cap, same weight for every token of the row


def test_vanilla_policy_gradient_equals_ppo_at_ratio_one_and_tis_reweights():
    logp = torch.log(torch.tensor([[0.5, 0.25]])).requires_grad_()
    adv, mask = torch.tensor([2.0]), torch.ones(1, 2)
    v, _ = policy_gradient_loss(logp, logp.detach(), adv, mask)
    (gv,) = torch.autograd.grad(v, logp)
    c, _ = clipped_policy_loss(logp, logp.detach(), adv, mask)
    (gc,) = torch.autograd.grad(c, logp)
    assert torch.allclose(gv, gc) and torch.allclose(gv, torch.full((1, 2), -1.0))  # -A / num_tokens
    stale = logp.detach() - torch.tensor([[math.log(4.0), math.log(0.5)]])  # ratios 4 and 0.5
    t, m = policy_gradient_loss(logp, stale, adv, mask, is_cap=2.0)
    (gt,) = torch.autograd.grad(t, logp)
    assert gt[0].tolist() == pytest.approx([-2.0, -0.5]) and m["clip_frac"] == 0.5  # weights min(4, 2) and 0.5


def test_importance_weight_metrics_show_weight_mass_collapsing():
    """Equal weights: ESS 1; one token carrying the batch: ESS 1/n; the mean and the share of
    near-zero weights over the masked tokens only (padding with a huge weight changes nothing)."""
    from learner.core_algos import importance_weight_metrics

    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    even = importance_weight_metrics(torch.tensor([[0.5, 0.5, 0.5, 0.5, 99.0]]), mask)
    assert even == pytest.approx({"is_weight_mean": 0.5, "is_weight_ess": 1.0, "is_weight_small": 0.0})
    one = importance_weight_metrics(torch.tensor([[2.0, 0.0, 0.0, 0.0, 99.0]]), mask)
    assert one == pytest.approx({"is_weight_mean": 0.5, "is_weight_ess": 0.25, "is_weight_small": 0.75})
    _, m = clipped_policy_loss(torch.zeros(1, 5), torch.zeros(1, 5), torch.ones(1), mask,
                               token_weights=torch.tensor([[2.0, 0.0, 0.0, 0.0, 99.0]]))
    assert m["is_weight_ess"] == pytest.approx(0.25)  # decoupled PPO reports them
