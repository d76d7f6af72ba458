"""Advantage estimators and policy-gradient losses: pure torch, no Ray.

Shapes: ``B`` samples (sequences) in a batch, ``T`` completion positions
(right-padded), ``mask`` is 1 on real completion tokens and 0 on padding.
"""

from __future__ import annotations

from typing import Literal

import torch

LossAgg = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]


def group_advantages(rewards: torch.Tensor, group_index: torch.Tensor, *, norm_by_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """GRPO group-relative advantage, one scalar per sample.

    ``A_i = (r_i - mean_g(r)) / (std_g(r) + eps)`` where ``g`` is the group
    (the samples of one prompt) of sample ``i``; without ``norm_by_std`` the
    division is skipped (Dr.GRPO). ``std`` is the unbiased sample std of the
    group and is taken as 0 for a group of one sample.

    Args:
        rewards: ``[B]`` float, one reward per sample.
        group_index: ``[B]`` long, ids in ``[0, G)`` naming each sample's group.
    Returns:
        ``[B]`` advantages (zero for groups whose rewards are all equal).
    """
    if rewards.shape != group_index.shape or rewards.dim() != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_index {tuple(group_index.shape)} must be equal 1-D")
    rewards = rewards.to(torch.float32)
    num_groups = int(group_index.max()) + 1 if group_index.numel() else 0
    count = torch.zeros(num_groups, dtype=torch.float32).index_add_(0, group_index, torch.ones_like(rewards))
    total = torch.zeros(num_groups, dtype=torch.float32).index_add_(0, group_index, rewards)
    mean = total / count.clamp(min=1)
    centred = rewards - mean[group_index]
    if not norm_by_std:
        return centred
    sq = torch.zeros(num_groups, dtype=torch.float32).index_add_(0, group_index, centred**2)
    std = torch.sqrt(sq / (count - 1).clamp(min=1))[group_index]
    # all-equal groups (std 0) have zero advantage, also when eps == 0
    return torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """Log-prob of ``tokens`` under ``softmax(logits / temperature)``.

    Args:
        logits: ``[B, T, V]`` (the logits that *predict* each token).
        tokens: ``[B, T]`` long.
    Returns:
        ``[B, T]`` float32 log-probs.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def aggregate(values: torch.Tensor, mask: torch.Tensor, mode: LossAgg, *, num_tokens: float | None = None,
              num_seqs: float | None = None, norm_constant: float | None = None) -> torch.Tensor:
    """Reduce per-token ``values [B, T]`` to a scalar.

    - ``token-mean``: ``sum(values * mask) / num_tokens``
    - ``seq-mean-token-sum``: ``sum(values * mask) / num_seqs`` (each sequence's
      token sum, averaged over sequences)
    - ``seq-mean-token-mean``: ``sum_b(mean_t(values_b)) / num_seqs``
    - ``seq-mean-token-sum-norm`` (Dr.GRPO): ``sum(values * mask) / (num_seqs * norm_constant)``,
      a constant such as the maximum completion length, so no sequence's tokens
      weigh more or less because of its own length

    ``num_tokens``/``num_seqs`` default to this tensor's own counts; pass the
    counts of the *whole* batch when accumulating gradients over micro-batches
    so the sum of micro-batch losses equals the full-batch loss.
    """
    mask = mask.to(values.dtype)
    if mode == "token-mean":
        denom = mask.sum() if num_tokens is None else num_tokens
        return (values * mask).sum() / max(float(denom), 1.0)
    denom = max(float(values.shape[0] if num_seqs is None else num_seqs), 1.0)
    if mode == "seq-mean-token-sum":
        return (values * mask).sum() / denom
    if mode == "seq-mean-token-mean":
        per_seq = (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_seq.sum() / denom
    if mode == "seq-mean-token-sum-norm":
        if not norm_constant or norm_constant <= 0:
            raise ValueError("seq-mean-token-sum-norm needs norm_constant > 0 (e.g. the max completion length)")
        return (values * mask).sum() / (denom * float(norm_constant))
    raise ValueError(f"unknown loss aggregation {mode!r}")


def clipped_policy_loss(logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, *, clip_low: float = 0.2, clip_high: float = 0.2,
                        loss_agg: LossAgg = "token-mean", num_tokens: float | None = None,
                        num_seqs: float | None = None, dual_clip: float = 0.0,
                        token_weights: torch.Tensor | None = None,
                        norm_constant: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip policy-gradient loss with asymmetric bounds (clip-higher).

    ``ratio = exp(logp - logp_behaviour)`` importance-corrects samples drawn by
    an older policy; per token the loss is
    ``max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))``.
    With ``ratio == 1`` its gradient is the REINFORCE gradient ``-A * grad logp``.

    Args:
        logprobs: ``[B, T]`` current-policy log-probs (require grad).
        behaviour_logprobs: ``[B, T]`` log-probs recorded at generation time.
        advantages: ``[B]`` (one per sequence) or ``[B, T]`` (per token).
        mask: ``[B, T]`` 1 on completion tokens.
        dual_clip: > 1 bounds the loss of negative-advantage tokens by ``-A * dual_clip``.
        token_weights: ``[B, T]`` per-token multipliers without gradient (or None).
        norm_constant: for ``loss_agg="seq-mean-token-sum-norm"`` (see :func:`aggregate`).
    Returns:
        ``(loss, metrics)``; metrics has ``clip_frac``, ``ratio_mean``,
        ``ratio_max`` and ``approx_kl`` (k3 estimate of KL(behaviour || current)).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1).expand_as(logprobs)
    # padding may hold anything: zero it before exp so it cannot become inf/nan
    log_ratio = torch.where(mask.bool(), logprobs - behaviour_logprobs, torch.zeros_like(logprobs))
    log_ratio = log_ratio.clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    if dual_clip > 0:  # negative advantages: bound the loss by -A * dual_clip
        per_token = torch.where(advantages < 0, torch.minimum(per_token, -advantages * dual_clip), per_token)
    if token_weights is not None:  # e.g. truncated importance weights of decoupled PPO (no gradient)
        per_token = per_token * token_weights
    loss = aggregate(per_token, mask, loss_agg, num_tokens=num_tokens, num_seqs=num_seqs,
                     norm_constant=norm_constant)
    metrics = _ratio_metrics(log_ratio, mask, clipped=clipped.detach() > unclipped.detach())
    return loss, metrics | (importance_weight_metrics(token_weights, mask) if token_weights is not None else {})


def policy_gradient_loss(logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, advantages: torch.Tensor,
                         mask: torch.Tensor, *, loss_agg: LossAgg = "token-mean", num_tokens: float | None = None,
                         num_seqs: float | None = None, norm_constant: float | None = None,
                         is_cap: float | None = None, is_level: Literal["token", "sequence"] = "token"
                         ) -> tuple[torch.Tensor, dict[str, float]]:
    """Vanilla policy gradient, optionally with truncated importance sampling.

    Per token the loss is ``-w * A * logp`` with ``w = 1`` (plain REINFORCE:
    on-policy samples assumed) or, with ``is_cap``, the truncated importance
    weight ``w = min(pi / pi_behaviour, is_cap)`` (no gradient), per token or
    per sequence (the product of the token ratios, which is the unbiased
    weight of a whole completion when the cap is not hit). Its gradient is
    ``-w * A * grad logp``: the REINFORCE gradient re-weighted to the current
    policy for samples a stale policy drew.

    Args:
        logprobs: ``[B, T]`` current-policy log-probs (require grad).
        behaviour_logprobs: ``[B, T]`` log-probs recorded at generation time.
        advantages: ``[B]`` or ``[B, T]``; mask: ``[B, T]``.
    Returns:
        ``(loss, metrics)`` with the metrics of :func:`clipped_policy_loss`;
        ``clip_frac`` is the fraction of tokens whose weight hit ``is_cap``.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1).expand_as(logprobs)
    log_ratio = torch.where(mask.bool(), logprobs - behaviour_logprobs, torch.zeros_like(logprobs)).clamp(-20.0, 20.0)
    per_token = -advantages * logprobs
    capped = torch.zeros_like(mask, dtype=torch.bool)
    if is_cap is not None:
        w = truncated_importance_weights(logprobs, behaviour_logprobs, cap=is_cap, mask=mask, level=is_level)
        capped = w >= is_cap
        per_token = per_token * w
    loss = aggregate(per_token, mask, loss_agg, num_tokens=num_tokens, num_seqs=num_seqs,
                     norm_constant=norm_constant)
    metrics = _ratio_metrics(log_ratio, mask, clipped=capped)
    return loss, metrics | (importance_weight_metrics(w, mask) if is_cap is not None else {})


def importance_weight_metrics(weights: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Of importance weights ``[B, T]`` over the masked tokens: ``is_weight_mean`` (below 1, the
    weights shrink the step), ``is_weight_ess`` (Kish's effective sample size as a fraction,
    ``(sum w)^2 / (n sum w^2)``: 1 when all are equal, small when a few tokens carry the batch)
    and ``is_weight_small`` (fraction below 0.1: samples the step all but ignores)."""
    with torch.no_grad():
        w = weights.detach()[mask.bool()].float()
        if not w.numel():
            return {}
        return {"is_weight_mean": float(w.mean()),
                "is_weight_ess": float(w.sum() ** 2 / (w.numel() * (w ** 2).sum()).clamp(min=1e-12)),
                "is_weight_small": float((w < 0.1).float().mean())}


def _ratio_metrics(log_ratio: torch.Tensor, mask: torch.Tensor, *, clipped: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        m = mask.bool()
        n = max(int(m.sum()), 1)
        lr = log_ratio.detach()[m]
        r = torch.exp(lr)
        return {
            "clip_frac": float(clipped[m].float().sum() / n),
            "ratio_mean": float(r.mean()) if r.numel() else 1.0,
            "ratio_max": float(r.max()) if r.numel() else 1.0,
            "approx_kl": float((torch.exp(-lr) - 1 + lr).mean()) if lr.numel() else 0.0,
        }


# ------------------------------------------------------------------------------------------------
# More advantage estimators, KL and entropy terms, importance weights
# ------------------------------------------------------------------------------------------------
def rloo_advantages(rewards: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """RLOO: ``A_i = r_i - mean_{j != i, j in g(i)} r_j`` (leave-one-out baseline).

    Unbiased: the baseline does not depend on the sample it scores. A group of
    one sample has advantage 0.

    Args:
        rewards: ``[B]``; group_index: ``[B]`` long.
    Returns:
        ``[B]``.
    """
    rewards = rewards.to(torch.float32)
    num_groups = int(group_index.max()) + 1 if group_index.numel() else 0
    count = torch.zeros(num_groups).index_add_(0, group_index, torch.ones_like(rewards))[group_index]
    total = torch.zeros(num_groups).index_add_(0, group_index, rewards)[group_index]
    others = (total - rewards) / (count - 1).clamp(min=1)
    return torch.where(count > 1, rewards - others, torch.zeros_like(rewards))


def reinforce_baseline_advantages(rewards: torch.Tensor, baseline: float, *, decay: float = 0.9
                                  ) -> tuple[torch.Tensor, float]:
    """REINFORCE with a moving-average baseline: ``A = r - b``, then
    ``b <- decay * b + (1 - decay) * mean(r)`` (the update uses this batch only
    after the advantages are computed, so they stay unbiased).

    Returns ``([B] advantages, new baseline)``.
    """
    rewards = rewards.to(torch.float32)
    adv = rewards - baseline
    return adv, decay * baseline + (1.0 - decay) * float(rewards.mean())


def batch_normalized_advantages(rewards: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """REINFORCE++: ``A = (r - mean_batch(r)) / (std_batch(r) + eps)`` over the whole
    batch (no groups). ``[B] -> [B]``."""
    rewards = rewards.to(torch.float32)
    if rewards.numel() < 2:
        return torch.zeros_like(rewards)
    centred = rewards - rewards.mean()
    std = rewards.std()
    return centred / (std + eps) if std > 0 else torch.zeros_like(rewards)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: Literal["k1", "k2", "k3"] = "k3"
                ) -> torch.Tensor:
    """Per-token estimate of ``KL(pi || pi_ref)`` from tokens sampled from ``pi``.

    With ``d = log pi - log pi_ref``: ``k1 = d`` (unbiased, high variance, can be
    negative), ``k2 = d^2 / 2`` (biased, low variance), ``k3 = exp(-d) - 1 + d``
    (unbiased, non-negative; Schulman's estimator). Shapes ``[B, T] -> [B, T]``.
    """
    d = logprobs - ref_logprobs
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        return torch.exp(-d) - 1.0 + d
    raise ValueError(f"unknown KL estimator {kind!r}")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` per position: ``[B, T, V] -> [B, T]``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def truncated_importance_weights(proximal_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, *,
                                 cap: float = 2.0, mask: torch.Tensor | None = None,
                                 level: Literal["token", "sequence"] = "token") -> torch.Tensor:
    """Truncated IS weight ``min(pi_prox / pi_behaviour, cap)``, no gradient. ``[B, T] -> [B, T]``.

    ``level="token"`` uses each token's own ratio; ``"sequence"`` uses the
    product of the ratios over the masked tokens of each row (``mask`` needed),
    broadcast to all of its tokens.
    """
    log_ratio = (proximal_logprobs - behaviour_logprobs).detach()
    if level == "sequence":
        if mask is None:
            raise ValueError("sequence-level importance weights need the mask")
        log_ratio = (log_ratio * mask).sum(-1, keepdim=True).expand_as(log_ratio)
    elif level != "token":
        raise ValueError(f"unknown importance-weight level {level!r}")
    return torch.exp(log_ratio.clamp(max=20.0)).clamp(max=cap)


def logprob_mismatch(logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor) -> dict[str, float | None]:
    """How far the engine's recorded log-probs are from the learner's recompute of the same
    tokens under the same weights (the rollout-training mismatch).

    Args:
        logprobs: ``[N]`` the learner's log-probs of ``N`` completion tokens.
        behaviour_logprobs: ``[N]`` the engine's log-probs of the same tokens, recorded
            with the same ``policy_version``.

    Returns:
        ``mismatch_abs_mean`` and ``mismatch_abs_max`` of ``|Δ log p|``, ``mismatch_ratio_std``
        (the spread of the importance ratio ``exp(Δ)`` this mismatch alone causes) and
        ``mismatch_tokens`` (``N``); None for each when ``N == 0``.
    """
    with torch.no_grad():
        delta = (logprobs.detach().float() - behaviour_logprobs.float()).clamp(-20.0, 20.0)
        if delta.numel() == 0:
            return {"mismatch_abs_mean": None, "mismatch_abs_max": None, "mismatch_ratio_std": None,
                    "mismatch_tokens": 0}
        return {"mismatch_abs_mean": float(delta.abs().mean()), "mismatch_abs_max": float(delta.abs().max()),
                "mismatch_ratio_std": float(delta.exp().std(correction=0)), "mismatch_tokens": int(delta.numel())}
