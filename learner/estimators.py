"""Name -> function tables for advantage estimators and policy losses.

``learner.advantage`` and ``learner.policy_loss`` select an entry; the learner
calls it and never branches on the name. Every entry adapts the config to a
pure function of ``learner.core_algos``. Shapes: ``B`` samples, ``T`` the
longest completion of a micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from learner.core_algos import (batch_normalized_advantages, clipped_policy_loss, group_advantages,
                                policy_gradient_loss, reinforce_baseline_advantages, rloo_advantages,
                                truncated_importance_weights)


@dataclass
class EstimatorState:
    """What an estimator carries across steps (checkpointed with the learner)."""

    baseline: float = 0.0
    """advantage=reinforce: moving average of rewards."""


def _grpo(rewards, group_index, cfg, state):
    return group_advantages(rewards, group_index, norm_by_std=cfg.norm_adv_by_std)


def _drgrpo(rewards, group_index, cfg, state):
    return group_advantages(rewards, group_index, norm_by_std=False)


def _rloo(rewards, group_index, cfg, state):
    return rloo_advantages(rewards, group_index)


def _reinforce(rewards, group_index, cfg, state):
    adv, state.baseline = reinforce_baseline_advantages(rewards, state.baseline)
    return adv


def _reinforce_pp(rewards, group_index, cfg, state):
    return batch_normalized_advantages(rewards)


ADVANTAGES: dict[str, Callable[..., torch.Tensor]] = {
    "grpo": _grpo, "drgrpo": _drgrpo, "rloo": _rloo, "reinforce": _reinforce, "reinforce++": _reinforce_pp,
}
"""``fn(rewards [B], group_index [B], cfg: LearnerConfig, state: EstimatorState) -> advantages [B]``."""


def _vanilla(logp, old, adv, cmask, cfg, agg: dict, proximal):
    cap = cfg.is_cap if cfg.off_policy == "tis" else None
    return policy_gradient_loss(logp, old, adv, cmask, is_cap=cap, is_level=cfg.is_level, **agg)


def _ppo_clip(logp, old, adv, cmask, cfg, agg: dict, proximal):
    weights = None
    if proximal is not None:  # decoupled PPO: clip against the proximal policy, IS-weight to behaviour
        weights = truncated_importance_weights(proximal, old, cap=cfg.is_cap, mask=cmask, level=cfg.is_level) * cmask
        old = proximal
    return clipped_policy_loss(logp, old, adv, cmask, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                               dual_clip=cfg.dual_clip, token_weights=weights, **agg)


POLICY_LOSSES: dict[str, Callable[..., tuple[torch.Tensor, dict]]] = {"vanilla": _vanilla, "ppo_clip": _ppo_clip}
"""``fn(logp [b, T], behaviour [b, T], adv [b], mask [b, T], cfg, agg, proximal [b, T] | None) -> (loss, metrics)``;
``agg``: ``loss_agg``, ``num_tokens``, ``num_seqs``, ``norm_constant`` (batch-global normalisers)."""
