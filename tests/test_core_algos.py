"""Advantage and loss math against values computed by hand."""

import math

import pytest
import torch

from learner.core_algos import aggregate, clipped_policy_loss, group_advantages, token_logprobs


def test_group_advantages_by_hand():
    # group 0: rewards 1, 0, 0, 1 -> mean 0.5, unbiased std sqrt(1/3)
    # group 1: rewards 2, 2      -> all equal -> zero advantage
    # group 2: a single sample   -> zero advantage
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 5.0])
    g = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    centred = group_advantages(r, g, norm_by_std=False)
    assert centred.tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0])
    std = math.sqrt(1 / 3)
    normed = group_advantages(r, g, norm_by_std=True, eps=0.0)
    assert normed[:4].tolist() == pytest.approx([0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std])
    assert normed[4:].tolist() == [0.0, 0.0, 0.0]


def test_group_advantages_interleaved_groups_and_shape_check():
    r = torch.tensor([3.0, 10.0, 1.0, 20.0])
    g = torch.tensor([0, 1, 0, 1])
    assert group_advantages(r, g, norm_by_std=False).tolist() == pytest.approx([1.0, -5.0, -1.0, 5.0])
    with pytest.raises(ValueError):
        group_advantages(r, g[:3])


def test_token_logprobs_matches_manual_softmax():
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    tokens = torch.tensor([[2, 1]])
    lp = token_logprobs(logits, tokens)
    z = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    assert lp.tolist()[0] == pytest.approx([3 - z, math.log(1 / 3)])
    lp_t = token_logprobs(logits, tokens, temperature=2.0)
    z2 = math.log(math.exp(0.5) + math.exp(1.0) + math.exp(1.5))
    assert lp_t[0, 0].item() == pytest.approx(1.5 - z2)


def test_aggregation_modes():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate(v, m, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate(v, m, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate(v, m, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    # Dr.GRPO: every sequence divided by the same constant, whatever its length
    assert aggregate(v, m, "seq-mean-token-sum-norm", norm_constant=5).item() == pytest.approx((6 + 4) / (2 * 5))
    with pytest.raises(ValueError, match="norm_constant"):
        aggregate(v, m, "seq-mean-token-sum-norm")
    # global normalisers: two micro-batches sum to the full-batch value
    full = aggregate(v, m, "token-mean")
    parts = aggregate(v[:1], m[:1], "token-mean", num_tokens=4) + aggregate(v[1:], m[1:], "token-mean", num_tokens=4)
    assert parts.item() == pytest.approx(full.item())
    with pytest.raises(ValueError):
        aggregate(v, m, "nope")


def _loss_and_grad(logp_value, old_value, adv, clip_low=0.2, clip_high=0.3):
    logp = torch.tensor([[logp_value]], requires_grad=True)
    loss, metrics = clipped_policy_loss(logp, torch.tensor([[old_value]]), torch.tensor([adv]), torch.ones(1, 1),
                                        clip_low=clip_low, clip_high=clip_high)
    loss.backward()
    return loss.item(), logp.grad.item(), metrics


def test_on_policy_gradient_is_reinforce():
    # ratio = 1: loss = -A, d loss / d logp = -A * ratio = -A
    loss, grad, m = _loss_and_grad(-1.0, -1.0, 2.0)
    assert loss == pytest.approx(-2.0)
    assert grad == pytest.approx(-2.0)
    assert m["clip_frac"] == 0.0 and m["ratio_mean"] == pytest.approx(1.0)


def test_clip_bounds_positive_advantage():
    # A > 0: ratio above 1 + clip_high is clipped (zero gradient); inside it is not.
    inside = math.log(1.25)  # ratio 1.25 < 1.3
    loss, grad, m = _loss_and_grad(inside, 0.0, 1.0)
    assert loss == pytest.approx(-1.25) and grad == pytest.approx(-1.25) and m["clip_frac"] == 0.0
    beyond = math.log(1.5)  # ratio 1.5 > 1.3 -> clipped at 1.3, gradient 0
    loss, grad, m = _loss_and_grad(beyond, 0.0, 1.0)
    assert loss == pytest.approx(-1.3) and grad == 0.0 and m["clip_frac"] == 1.0
    # below 1 - clip_low with A > 0: not clipped (min of the two is the unclipped term)
    low = math.log(0.5)
    loss, grad, _ = _loss_and_grad(low, 0.0, 1.0)
    assert loss == pytest.approx(-0.5) and grad == pytest.approx(-0.5)


def test_clip_bounds_negative_advantage():
    # A < 0: ratio below 1 - clip_low is clipped (zero gradient); above 1 it is not.
    loss, grad, m = _loss_and_grad(math.log(0.5), 0.0, -1.0)
    assert loss == pytest.approx(0.8) and grad == 0.0 and m["clip_frac"] == 1.0
    loss, grad, _ = _loss_and_grad(math.log(2.0), 0.0, -1.0)
    assert loss == pytest.approx(2.0) and grad == pytest.approx(2.0)
    # exactly at the bound: value equal either way, gradient still flows (unclipped branch)
    loss, grad, _ = _loss_and_grad(math.log(0.8), 0.0, -1.0)
    assert loss == pytest.approx(0.8)


def test_importance_ratio_weights_stale_samples():
    # Same advantage, behaviour policy twice as likely as current: gradient scaled by ratio 0.5... but
    # clip_low=0.6 keeps it inside the trust region for A > 0.
    loss, grad, m = _loss_and_grad(math.log(0.5), 0.0, 1.0, clip_low=0.6, clip_high=0.6)
    assert grad == pytest.approx(-0.5)
    assert m["approx_kl"] == pytest.approx(math.exp(math.log(2)) - 1 - math.log(2))


def test_padding_is_ignored():
    logp = torch.tensor([[-1.0, 100.0]], requires_grad=True)
    loss, _ = clipped_policy_loss(logp, torch.tensor([[-1.0, 0.0]]), torch.tensor([1.0]), torch.tensor([[1.0, 0.0]]),
                                  loss_agg="token-mean")
    loss.backward()
    assert loss.item() == pytest.approx(-1.0)
    assert logp.grad.tolist() == [[-1.0, 0.0]]


def test_learning_rate_schedules():
    from learner.learner import LearnerConfig, lr_lambda

    f = lr_lambda(LearnerConfig(lr_schedule="linear", warmup_steps=2), total_steps=12)
    assert [f(s) for s in (0, 1, 2, 7, 12, 20)] == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0, 0.0])
    c = lr_lambda(LearnerConfig(lr_schedule="cosine"), total_steps=10)
    assert [c(0), c(5), c(10)] == pytest.approx([1.0, 0.5, 0.0])
    k = lr_lambda(LearnerConfig(), total_steps=10)
    assert {k(s) for s in range(0, 30, 7)} == {1.0}


def test_logprob_mismatch_stats_and_the_empty_case():
    from learner.core_algos import logprob_mismatch

    learner = torch.tensor([-1.0, -2.0, -0.5, -3.0])
    engine = torch.tensor([-1.0, -2.1, -0.3, -3.0])  # Δ = 0, +0.1, -0.2, 0
    m = logprob_mismatch(learner, engine)
    assert m["mismatch_abs_mean"] == pytest.approx(0.075) and m["mismatch_abs_max"] == pytest.approx(0.2)
    assert m["mismatch_ratio_std"] == pytest.approx(0.10304, rel=1e-3)  # population std of e^0, e^.1, e^-.2, e^0
    assert m["mismatch_tokens"] == 4
    assert logprob_mismatch(torch.zeros(0), torch.zeros(0)) == {
        "mismatch_abs_mean": None, "mismatch_abs_max": None, "mismatch_ratio_std": None, "mismatch_tokens": 0}
