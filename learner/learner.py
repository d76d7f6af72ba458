"""The learner: turns scored groups into one optimizer step per batch.

A plain class; ``create_learner`` makes it a Ray actor (placed by its declared
``num_cpus``/``num_gpus``/resources, so it can sit on a GPU node).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from actors.weights.collective import BroadcastSource
from actors.device import check_device, mixed_precision, torch_device, torch_dtype
from actors.tasks.evaluate import greedy_accuracy
from actors.reward.worker import load_reward_fn
from actors.rollout.worker import load_policy
from actors.tasks.base import Example
from actors.types import Group
from actors.weights.object_store import FlatParams, Payload, WeightPublisher
from learner.core_algos import (aggregate, batch_normalized_advantages, clipped_policy_loss, entropy_from_logits,
                                group_advantages, kl_estimate, policy_gradient_loss, reinforce_baseline_advantages,
                                rloo_advantages, token_logprobs, truncated_importance_weights)


@dataclass(kw_only=True)
class LearnerConfig:
    lr: float = 5e-4
    """Peak AdamW learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    """AdamW betas."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    micro_batch_size: int = 64
    """Samples per forward/backward; gradients accumulate over micro-batches."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate decay after warm-up, over ``train.steps``."""
    warmup_steps: int = 0
    """Linear warm-up steps from 0 to ``lr``."""
    clip_low: float = 0.2
    """PPO clip: ratio is clipped below at ``1 - clip_low``."""
    clip_high: float = 0.28
    """PPO clip: ratio is clipped above at ``1 + clip_high`` (clip-higher)."""
    advantage: Literal["grpo", "drgrpo", "rloo", "reinforce", "reinforce++"] = "grpo"
    """Advantage estimator: grpo (group mean, /std if norm_adv_by_std), drgrpo (group mean, no std),
    rloo (leave-one-out group mean), reinforce (moving-average baseline), reinforce++ (batch-normalised)."""
    norm_adv_by_std: bool = True
    """grpo only: divide group-centred rewards by the group std."""
    kl_coef: float = 0.0
    """Weight of KL(policy || frozen initial policy) in the loss (0 = no reference model is loaded)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """Per-token KL estimator for kl_coef."""
    kl_in_reward: bool = False
    """Apply kl_coef as a reward penalty (reward -= kl_coef * summed per-token KL of the sample,
    before advantages) instead of as a loss term."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (subtracted from the loss)."""
    ppo_epochs: int = 1
    """Passes over each batch (each pass = mini_batches optimizer steps; one policy_version per batch)."""
    mini_batches: int = 1
    """Optimizer steps per pass over a batch (the batch split in this many parts)."""
    dual_clip: float = 0.0
    """Dual clip: for negative advantages bound the per-token loss by -A * dual_clip (0 = off; > 1)."""
    policy_loss: Literal["ppo_clip", "vanilla"] = "ppo_clip"
    """ppo_clip: PPO clipped surrogate of the ratio (clip_low/clip_high, dual_clip); vanilla: plain
    policy gradient -A * log pi (REINFORCE; with off_policy=tis, importance-weighted)."""
    off_policy: Literal["behaviour", "tis", "decoupled"] = "behaviour"
    """Correction for samples a stale policy drew. behaviour: the PPO ratio is taken against the behaviour
    policy (vanilla: no correction); tis (vanilla only): weight by the truncated ratio min(pi / behaviour,
    is_cap); decoupled (ppo_clip only): clip against the learner's policy at consumption time and weight by
    the truncated ratio proximal / behaviour."""
    is_cap: float = 2.0
    """tis and decoupled: cap of the truncated importance weight."""
    is_level: Literal["token", "sequence"] = "token"
    """tis and decoupled: importance weight per token, or per sequence (product of the token ratios)."""
    filter_equal_groups: bool = False
    """Leave out groups whose rewards are all equal (no group-relative signal; DAPO-style filtering)."""
    overlong_penalty: float = 0.0
    """Subtracted from the reward of completions cut at max_new_tokens without EOS."""
    loss_agg: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean",
                      "seq-mean-token-sum-norm"] = "seq-mean-token-sum"
    """How per-token losses are reduced to the batch loss: over all tokens; per sequence summed then
    averaged over sequences; per sequence averaged then averaged; or Dr.GRPO's sum over tokens divided by
    sequences x loss_norm_constant."""
    loss_norm_constant: int = 0
    """seq-mean-token-sum-norm: the constant divisor per sequence (0 = the max completion length)."""
    num_cpus: float = 1.0
    """CPUs Ray reserves for the learner."""
    num_gpus: float = 0.0
    """GPUs Ray reserves for the learner; with device auto, > 0 trains on CUDA."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the learner trains: auto = cuda when num_gpus > 0 (Ray hides GPUs from actors that reserve none), else cpu."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Compute dtype (torch.autocast): auto = bfloat16 on CUDA, float32 on CPU. Master weights and AdamW
    state stay float32 whatever this is."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources the learner needs."""
    num_threads: int = 1
    """torch intra-op threads in the learner (1 by default: with 2 rollout workers on 2
    cores, a 2-thread learner oversubscribes them and async steps got slower)."""

    def __post_init__(self):
        checks = [
            (self.lr > 0, "learner.lr", "must be > 0"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "learner.betas", "must be two values in [0, 1)"),
            (self.weight_decay >= 0, "learner.weight_decay", "must be >= 0"),
            (self.eps > 0, "learner.eps", "must be > 0"),
            (self.num_cpus >= 0, "learner.num_cpus", "must be >= 0"),
            (self.num_gpus >= 0, "learner.num_gpus", "must be >= 0"),
            (self.max_grad_norm >= 0, "learner.max_grad_norm", "must be >= 0"),
            (self.micro_batch_size >= 1, "learner.micro_batch_size", "must be >= 1"),
            (self.warmup_steps >= 0, "learner.warmup_steps", "must be >= 0"),
            (0 <= self.clip_low < 1, "learner.clip_low", "must be in [0, 1)"),
            (self.clip_high >= 0, "learner.clip_high", "must be >= 0"),
            (self.num_threads >= 1, "learner.num_threads", "must be >= 1"),
            (self.kl_coef >= 0, "learner.kl_coef", "must be >= 0"),
            (self.ppo_epochs >= 1, "learner.ppo_epochs", "must be >= 1"),
            (self.mini_batches >= 1, "learner.mini_batches", "must be >= 1"),
            (self.dual_clip == 0 or self.dual_clip > 1, "learner.dual_clip", "must be 0 (off) or > 1"),
            (self.is_cap > 0, "learner.is_cap", "must be > 0"),
            (self.overlong_penalty >= 0, "learner.overlong_penalty", "must be >= 0"),
            (self.entropy_coef >= 0, "learner.entropy_coef", "must be >= 0"),
            (self.loss_norm_constant >= 0, "learner.loss_norm_constant", "must be >= 0"),
            (self.off_policy != "tis" or self.policy_loss == "vanilla", "learner.off_policy",
             "tis weights the vanilla policy gradient: set learner.policy_loss=vanilla (PPO-clip already "
             "takes its ratio against the behaviour policy; decoupled is its truncated-IS variant)"),
            (self.off_policy != "decoupled" or self.policy_loss == "ppo_clip", "learner.off_policy",
             "decoupled needs learner.policy_loss=ppo_clip (use tis with vanilla)"),
            (self.dual_clip == 0 or self.policy_loss == "ppo_clip", "learner.dual_clip",
             "only applies to learner.policy_loss=ppo_clip"),
        ]
        for ok, key, msg in checks:
            if not ok:
                raise ValueError(f"{key}: {msg}")
        check_device("learner", self.device, self.dtype, self.num_gpus)


def lr_lambda(cfg: LearnerConfig, total_steps: int):
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        if cfg.lr_schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


@dataclass
class TrainBatch:
    """Trainable samples of a list of groups, flattened (one row per sample)."""

    sequences: list[list[int]]  # prompt + completion ids
    prompt_lens: list[int]
    behaviour_logprobs: list[list[float]]
    rewards: torch.Tensor  # [B]
    group_index: torch.Tensor  # [B]
    versions: list[int]

    @classmethod
    def from_groups(cls, groups: list[Group], *, overlong_penalty: float = 0.0,
                    filter_equal_groups: bool = False) -> "TrainBatch":
        """``overlong_penalty`` is subtracted from the reward of samples cut at
        max_new_tokens (no EOS); ``filter_equal_groups`` leaves out groups whose
        rewards (after the penalty) are all equal: they carry no group-relative signal."""
        seqs, plens, lps, rewards, gidx, versions = [], [], [], [], [], []
        gi = 0
        for g in groups:
            samples = g.trainable_samples()
            rs = [float(s.reward) - (0.0 if s.finished else overlong_penalty) for s in samples]
            if not samples or (filter_equal_groups and len(set(rs)) == 1):
                continue
            for s, r in zip(samples, rs):
                seqs.append(list(g.prompt_ids) + list(s.completion_ids))
                plens.append(len(g.prompt_ids))
                lps.append(list(s.logprobs))
                rewards.append(r)
                gidx.append(gi)
                versions.append(s.policy_version)
            gi += 1
        return cls(seqs, plens, lps, torch.tensor(rewards, dtype=torch.float32),
                   torch.tensor(gidx, dtype=torch.long), versions)

    def __len__(self) -> int:
        return len(self.sequences)


def pad_micro_batch(batch: TrainBatch, idx: list[int], pad_id: int, device):
    """Right-padded tensors for rows ``idx``: input_ids/attention/positions ``[b, L]``,
    completion targets, behaviour log-probs and mask ``[b, T]`` aligned to the
    logits that predict them."""
    rows = [batch.sequences[i] for i in idx]
    L = max(len(r) for r in rows)
    T = max(len(r) - batch.prompt_lens[i] for r, i in zip(rows, idx))
    input_ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), L), dtype=torch.long)
    targets = torch.full((len(rows), T), pad_id, dtype=torch.long)
    old = torch.zeros((len(rows), T), dtype=torch.float32)
    cmask = torch.zeros((len(rows), T), dtype=torch.float32)
    pred_pos = torch.zeros((len(rows), T), dtype=torch.long)  # position of the logit predicting token t
    for b, (r, i) in enumerate(zip(rows, idx)):
        p, c = batch.prompt_lens[i], len(r) - batch.prompt_lens[i]
        input_ids[b, : len(r)] = torch.tensor(r)
        attn[b, : len(r)] = 1
        targets[b, :c] = torch.tensor(r[p:])
        old[b, :c] = torch.tensor(batch.behaviour_logprobs[i])
        cmask[b, :c] = 1
        pred_pos[b, :c] = torch.arange(p - 1, p - 1 + c)
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    return (input_ids.to(device), attn.to(device), positions.to(device), targets.to(device), old.to(device),
            cmask.to(device), pred_pos.to(device))


class Learner(BroadcastSource):
    """Holds the trained policy, its optimizer and the weight publisher (and is rank 0
    of the collective weight-sync group, ``actors.weights.collective``)."""

    def __init__(self, model_path: str, cfg: LearnerConfig, *, total_steps: int, temperature: float = 1.0,
                 seed: int = 0, max_new_tokens: int = 0, publish_dtype: str | None = None):
        """``max_new_tokens``: the completion-length limit (the default Dr.GRPO loss constant);
        ``publish_dtype``: the rollout workers' weight dtype (default: the master's, float32)."""
        torch.set_num_threads(cfg.num_threads)
        torch.manual_seed(seed)
        self.cfg = cfg
        self.device = torch_device(cfg.device, cfg.num_gpus, "learner.device")
        # fp32 master weights; forward passes compute in the configured dtype (autocast)
        self.model, self.tokenizer = load_policy(model_path, device=self.device, dtype="float32")
        mixed_precision(self.model, torch_dtype(cfg.dtype, self.device))
        # eval mode: no dropout, so the recomputed log-probs match the rollout's
        # (gradients flow all the same)
        self.model.eval()
        self.flat = FlatParams(self.model)  # before the optimizer: params keep identity
        self.publisher = WeightPublisher(self.flat, wire_dtype=getattr(torch, publish_dtype) if publish_dtype else None)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=tuple(cfg.betas),
                                           eps=cfg.eps, weight_decay=cfg.weight_decay,
                                           fused=True if self.device.type == "cuda" else None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, total_steps))
        self.temperature = temperature if temperature > 0 else 1.0
        self.norm_constant = float(cfg.loss_norm_constant or max_new_tokens)
        if cfg.loss_agg == "seq-mean-token-sum-norm" and self.norm_constant <= 0:
            raise ValueError("learner.loss_norm_constant: set it (> 0) or pass the max completion length")
        self.pad_id = self.tokenizer.pad_token_id
        self.baseline = 0.0  # advantage="reinforce": moving average of rewards
        self.ref_model = None
        if cfg.kl_coef > 0:  # frozen copy of the initial policy
            self.ref_model, _ = load_policy(model_path, device=self.device, dtype="float32")
            mixed_precision(self.ref_model, torch_dtype(cfg.dtype, self.device))
            self.ref_model.eval().requires_grad_(False)

    # -- phase 2 of a training step: update ------------------------------------------------
    @property
    def policy_version(self) -> int:
        return self.publisher.version

    def train_step(self, groups: list[Group]) -> dict:
        """One optimizer step on the trainable samples of ``groups``; bumps the version."""
        t0 = time.perf_counter()
        # a fixed order (by prompt uid), whatever order the groups arrived in: the same
        # batch always gives the same update (exact resume depends on it)
        batch = TrainBatch.from_groups(sorted(groups, key=lambda g: g.prompt.uid),
                                       overlong_penalty=self.cfg.overlong_penalty,
                                       filter_equal_groups=self.cfg.filter_equal_groups)
        if len(batch) == 0:
            if self.cfg.filter_equal_groups:  # every group filtered: a step without an update
                self.scheduler.step()
                self.publisher.bump()
                return {"loss": 0.0, "grad_norm": 0.0, "lr": self.scheduler.get_last_lr()[0], "skipped_step": 0,
                        "clip_frac": None, "ratio_mean": None, "ratio_max": None, "approx_kl": None,
                        "reward_mean": _mean_reward(groups), "reward_std": 0.0, "adv_abs_mean": 0.0,
                        "zero_adv_group_frac": 1.0, "samples": sum(len(g.trainable_samples()) for g in groups),
                        "active_samples": 0, "tokens": 0, "sequence_tokens": 0,
                        "response_len_mean": 0.0, "staleness_mean": 0.0, "staleness_max": 0,
                        "behaviour_versions": [], "update_s": time.perf_counter() - t0, "reward_by_name": {},
                        "filtered_groups": len(groups)}
            raise ValueError("train_step got no trainable samples")
        if self.ref_model is not None and self.cfg.kl_in_reward:
            batch.rewards = batch.rewards - self.cfg.kl_coef * self.sequence_kl(batch)
        adv = self.advantages(batch)
        proximal = self.proximal_logprobs(batch) if self.cfg.off_policy == "decoupled" else None
        parts = [list(range(len(batch)))[i::self.cfg.mini_batches] for i in range(self.cfg.mini_batches)]
        parts = [p for p in parts if p]
        lr = self.scheduler.get_last_lr()[0]
        losses, skipped, active = [], 0, 0
        for _ in range(self.cfg.ppo_epochs):
            for part in parts:
                self.optimizer.zero_grad(set_to_none=True)
                loss, n_active, ratio_metrics = self.accumulate_gradients(batch, adv, rows=part, proximal=proximal)
                losses.append(loss)
                active = max(active, n_active)
                grads = [p for p in self.model.parameters() if p.grad is not None]
                if not grads:  # every group had all-equal rewards: nothing to learn from this part
                    grad_norm = 0.0
                elif self.cfg.max_grad_norm > 0:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(grads, self.cfg.max_grad_norm))
                else:
                    grad_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in grads])))
                if math.isfinite(grad_norm):  # never let a non-finite gradient touch the weights
                    if grads:
                        self.optimizer.step()
                else:
                    skipped += 1
        loss = sum(losses) / len(losses)
        self.scheduler.step()
        self.publisher.bump()
        num_tokens = sum(len(s) - p for s, p in zip(batch.sequences, batch.prompt_lens))
        stale = [self.publisher.version - 1 - v for v in batch.versions]
        per_name: dict[str, list[float]] = {}
        for g in groups:
            for s in g.trainable_samples():
                for name, r in s.rewards.items():
                    per_name.setdefault(name, []).append(r)
        return {
            "loss": loss, "grad_norm": grad_norm, "lr": lr, "skipped_step": skipped, **ratio_metrics,
            "reward_mean": float(batch.rewards.mean()),
            "reward_std": float(batch.rewards.std()) if len(batch) > 1 else 0.0,
            "adv_abs_mean": float(adv.abs().mean()),
            "zero_adv_group_frac": _fraction_all_equal(batch.rewards, batch.group_index),
            # samples consumed (trained on, or filtered out by filter_equal_groups)
            "samples": sum(len(g.trainable_samples()) for g in groups), "active_samples": active,
            "filtered_groups": len(groups) - int(batch.group_index.max()) - 1 if len(batch) else len(groups),
            "tokens": num_tokens, "sequence_tokens": sum(len(s) for s in batch.sequences),
            "response_len_mean": num_tokens / len(batch),
            "staleness_mean": sum(stale) / len(stale), "staleness_max": max(stale),
            "behaviour_versions": sorted(set(batch.versions)), "update_s": time.perf_counter() - t0,
            "reward_by_name": {name: sum(v) / len(v) for name, v in per_name.items()},
        }

    def advantages(self, batch: TrainBatch) -> torch.Tensor:
        """``[B]`` advantages of the batch with the configured estimator."""
        kind, r, g = self.cfg.advantage, batch.rewards, batch.group_index
        if kind == "grpo":
            return group_advantages(r, g, norm_by_std=self.cfg.norm_adv_by_std)
        if kind == "drgrpo":
            return group_advantages(r, g, norm_by_std=False)
        if kind == "rloo":
            return rloo_advantages(r, g)
        if kind == "reinforce":
            adv, self.baseline = reinforce_baseline_advantages(r, self.baseline)
            return adv
        return batch_normalized_advantages(r)

    @torch.no_grad()
    def sequence_kl(self, batch: TrainBatch) -> torch.Tensor:
        """``[B]``: each sample's summed per-token KL estimate to the reference policy."""
        out = []
        mb = self.cfg.micro_batch_size
        for start in range(0, len(batch), mb):
            idx = list(range(start, min(start + mb, len(batch))))
            ids, attn, pos, targets, _, cmask, pred_pos = pad_micro_batch(batch, idx, self.pad_id, self.device)
            lp = [self._completion_logprobs(m, ids, attn, pos, pred_pos, targets)[1]
                  for m in (self.model, self.ref_model)]
            out.append((kl_estimate(lp[0], lp[1], self.cfg.kl_estimator) * cmask).sum(-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def proximal_logprobs(self, batch: TrainBatch) -> list[list[float]]:
        """Log-probs of every completion token under the learner's current weights."""
        out: list[list[float]] = []
        mb = self.cfg.micro_batch_size
        for start in range(0, len(batch), mb):
            idx = list(range(start, min(start + mb, len(batch))))
            ids, attn, pos, targets, _, cmask, pred_pos = pad_micro_batch(batch, idx, self.pad_id, self.device)
            _, logp = self._completion_logprobs(self.model, ids, attn, pos, pred_pos, targets)
            out += [row[: int(m.sum())] for row, m in zip(logp.cpu().tolist(), cmask.cpu())]
        return out

    def _completion_logprobs(self, model, ids, attn, pos, pred_pos, targets):
        """Forward ``model``; returns the logits that predict each completion token
        ``[b, T, V]`` and the tokens' log-probs ``[b, T]`` at the sampling temperature."""
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits
        pred = logits.gather(1, pred_pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        return pred, token_logprobs(pred, targets, temperature=self.temperature)

    def accumulate_gradients(self, batch: TrainBatch, adv: torch.Tensor, *, skip_zero_advantage: bool | None = None,
                             rows: list[int] | None = None, proximal: list[list[float]] | None = None):
        """Backward the batch loss over micro-batches into ``.grad``.

        Returns ``(loss, active_samples, ratio_metrics)``; ratio metrics
        (clip_frac, ratio_mean/max, approx_kl) cover the active samples and are
        None when no sample was active.

        A sample with zero advantage contributes exactly zero to the policy-gradient
        loss and to its gradient (per token the loss is ``-A * f(ratio)``); the
        normalisers still count it, so skipping it leaves the gradient unchanged
        and saves its forward/backward (all-equal groups are common early and late
        in training). A per-sample term that does not vanish with A (KL, entropy)
        must pass ``skip_zero_advantage=False``.
        """
        part = list(range(len(batch))) if rows is None else rows
        num_tokens = float(sum(len(batch.sequences[i]) - batch.prompt_lens[i] for i in part))
        num_seqs = float(len(part))
        if skip_zero_advantage is None:  # KL-loss and entropy terms do not vanish with the advantage
            skip_zero_advantage = (self.cfg.kl_coef == 0 or self.cfg.kl_in_reward) and self.cfg.entropy_coef == 0
        rows = [i for i in part if adv[i] != 0 or not skip_zero_advantage]
        sums: dict[str, float] = {}
        loss_total = 0.0
        mb = self.cfg.micro_batch_size
        for start in range(0, len(rows), mb):
            idx = rows[start : start + mb]
            ids, attn, pos, targets, old, cmask, pred_pos = pad_micro_batch(batch, idx, self.pad_id, self.device)
            pred, logp = self._completion_logprobs(self.model, ids, attn, pos, pred_pos, targets)
            agg = dict(mask=cmask, mode=self.cfg.loss_agg, num_tokens=num_tokens, num_seqs=num_seqs,
                       norm_constant=self.norm_constant)
            loss, m = self._policy_loss(logp, old, adv[idx].to(self.device), cmask, agg,
                                        proximal=[proximal[i] for i in idx] if proximal is not None else None)
            if self.ref_model is not None and not self.cfg.kl_in_reward:
                with torch.no_grad():
                    _, ref_logp = self._completion_logprobs(self.ref_model, ids, attn, pos, pred_pos, targets)
                kl = aggregate(kl_estimate(logp, ref_logp, self.cfg.kl_estimator), **agg)
                loss = loss + self.cfg.kl_coef * kl
                m["kl"] = float(kl.detach())
            if self.cfg.entropy_coef > 0:
                ent = aggregate(entropy_from_logits(pred / self.temperature), **agg)
                loss = loss - self.cfg.entropy_coef * ent
                m["entropy"] = float(ent.detach())
            loss.backward()
            loss_total += float(loss.detach())
            w = len(idx) / len(rows)
            for k, v in m.items():
                sums[k] = max(sums.get(k, v), v) if k == "ratio_max" else sums.get(k, 0.0) + w * v
        metrics = {k: sums.get(k) for k in ("clip_frac", "ratio_mean", "ratio_max", "approx_kl", "kl", "entropy")
                   if k in sums or k in ("clip_frac", "ratio_mean", "ratio_max", "approx_kl")}
        return loss_total, len(rows), metrics

    def _policy_loss(self, logp, old, adv, cmask, agg: dict, *, proximal: list[list[float]] | None):
        """The configured policy loss of one micro-batch (see ``policy_loss``/``off_policy``)."""
        c = self.cfg
        common = {k: v for k, v in agg.items() if k not in ("mask", "mode")}
        common["loss_agg"] = agg["mode"]
        if c.policy_loss == "vanilla":
            cap = c.is_cap if c.off_policy == "tis" else None
            return policy_gradient_loss(logp, old, adv, cmask, is_cap=cap, is_level=c.is_level, **common)
        weights = None
        if proximal is not None:  # decoupled PPO: clip against the proximal policy, IS-weight to behaviour
            prox = torch.zeros_like(old)
            for b, row in enumerate(proximal):
                prox[b, : len(row)] = torch.tensor(row)
            weights = truncated_importance_weights(prox, old, cap=c.is_cap, mask=cmask, level=c.is_level) * cmask
            old = prox
        return clipped_policy_loss(logp, old, adv, cmask, clip_low=c.clip_low, clip_high=c.clip_high,
                                   dual_clip=c.dual_clip, token_weights=weights, **common)

    # -- phase 3: sync weights ----------------------------------------------------------------
    def publish_weights(self, after_update: dict | None = None) -> Payload:
        """Publish the current weights. ``after_update`` is the result of the
        ``train_step`` this publish follows: passed as an object ref it makes the
        publish depend on that step (a failed step publishes nothing)."""
        return self.publisher.publish()

    # -- evaluation and output -------------------------------------------------------------------
    def evaluate(self, examples: list[Example], max_new_tokens: int, reward: str = "exact_match") -> float:
        return greedy_accuracy(self.model, self.tokenizer, examples, max_new_tokens=max_new_tokens,
                               reward_fn=load_reward_fn(reward))

    def save_policy(self, path: str) -> str:
        os.makedirs(path, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        return path

    def save_state(self, path: str) -> None:
        """Policy (safetensors via save_pretrained) + optimizer, scheduler, RNG, version."""
        import random

        self.save_policy(os.path.join(path, "policy"))
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "policy_version": self.publisher.version, "baseline": self.baseline,
                    "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}},
                   os.path.join(path, "learner_state.pt"))

    def load_state(self, path: str) -> int:
        """Load what ``save_state`` wrote (our own file: weights_only=False is safe here)."""
        import random

        from safetensors.torch import load_file

        weights = {}
        for f in sorted(os.listdir(os.path.join(path, "policy"))):
            if f.endswith(".safetensors"):
                weights.update(load_file(os.path.join(path, "policy", f)))
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
            raise ValueError(f"checkpoint {path} does not match the policy: missing {missing}, unexpected {unexpected}")
        state = torch.load(os.path.join(path, "learner_state.pt"), weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.baseline = state["baseline"]
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        self.publisher.version = state["policy_version"]
        return self.publisher.version

    def param_vector(self) -> torch.Tensor:
        """A copy of all parameters (tests compare weights across components)."""
        return torch.cat([b.detach().float().cpu().reshape(-1) for b in self.flat.buffers.values()])

    def where(self) -> dict:
        from actors.runtime.actors import where

        return where()

    def weights_digest(self) -> str:
        """Of the weights as published (the cast the rollout workers hold)."""
        from actors.runtime.actors import weights_digest

        return weights_digest(self.publisher.wire())


def _mean_reward(groups: list[Group]) -> float:
    rs = [s.reward for g in groups for s in g.trainable_samples()]
    return sum(rs) / len(rs) if rs else 0.0


def _fraction_all_equal(rewards: torch.Tensor, group_index: torch.Tensor) -> float:
    groups = group_index.unique()
    same = sum(1 for g in groups if rewards[group_index == g].unique().numel() == 1)
    return same / max(1, len(groups))


def create_learner(model_path: str, cfg: LearnerConfig, placement: dict | None = None, **kwargs):
    import ray

    from actors.runtime.actors import actor_env

    return ray.remote(Learner).options(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, resources=cfg.resources or None,
                                       runtime_env=actor_env(cfg.num_threads, passive_omp=False),
                                       **(placement or {})).remote(model_path, cfg, **kwargs)
