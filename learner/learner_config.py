"""The learner's settings (``learner`` config section) and its learning-rate schedule.

Pure Python; ``learner.learner`` re-exports both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from actors.device import check_device, device_kind
from actors.validation import require


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
    """Compute dtype (torch.autocast): auto = bfloat16 on CUDA, and on a CPU with bf16 matrix instructions
    (AMX-BF16 or AVX512-BF16) for a policy of >= 50M parameters; float32 otherwise. Master weights and AdamW
    state stay float32 whatever this is."""
    resources: dict[str, float] = field(default_factory=dict)
    """Custom Ray resources the learner needs."""
    num_threads: int = 1
    """torch intra-op threads in the learner (1 by default: with 2 rollout workers on 2
    cores, a 2-thread learner oversubscribes them and async steps got slower)."""
    num_workers: int = 1
    """Learner ranks: > 1 shards the policy, its gradients and AdamW state over this many
    processes with FSDP2 (one unit per decoder layer; gloo on CPU, NCCL when every rank has a
    GPU), each reserving num_cpus/num_gpus/resources; the batch is split across them by tokens."""
    placement: Literal["strict_pack", "pack", "spread"] = "strict_pack"
    """learner.num_workers > 1: how the ranks' placement group places them (strict_pack: one node)."""
    rank_timeout_s: float = 300.0
    """learner.num_workers > 1: a collective of the ranks (a step's gradient reduction, a weight
    gather) that takes longer fails the run naming the rank (a dead or stuck rank)."""
    offload: bool = False
    """learner.num_workers > 1 on CUDA: keep parameters, gradients and optimizer state in host memory
    between uses (FSDP2's CPUOffloadPolicy)."""

    def __post_init__(self):
        require(self.lr > 0, "learner.lr", "must be > 0")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "learner.betas",
                "must be two values in [0, 1)")
        require(self.weight_decay >= 0, "learner.weight_decay", "must be >= 0")
        require(self.eps > 0, "learner.eps", "must be > 0")
        require(self.num_cpus >= 0, "learner.num_cpus", "must be >= 0")
        require(self.num_gpus >= 0, "learner.num_gpus", "must be >= 0")
        require(self.max_grad_norm >= 0, "learner.max_grad_norm", "must be >= 0")
        require(self.micro_batch_size >= 1, "learner.micro_batch_size", "must be >= 1")
        require(self.warmup_steps >= 0, "learner.warmup_steps", "must be >= 0")
        require(0 <= self.clip_low < 1, "learner.clip_low", "must be in [0, 1)")
        require(self.clip_high >= 0, "learner.clip_high", "must be >= 0")
        require(self.num_threads >= 1, "learner.num_threads", "must be >= 1")
        require(self.kl_coef >= 0, "learner.kl_coef", "must be >= 0")
        require(self.ppo_epochs >= 1, "learner.ppo_epochs", "must be >= 1")
        require(self.mini_batches >= 1, "learner.mini_batches", "must be >= 1")
        require(self.dual_clip == 0 or self.dual_clip > 1, "learner.dual_clip", "must be 0 (off) or > 1")
        require(self.is_cap > 0, "learner.is_cap", "must be > 0")
        require(self.overlong_penalty >= 0, "learner.overlong_penalty", "must be >= 0")
        require(self.entropy_coef >= 0, "learner.entropy_coef", "must be >= 0")
        require(self.loss_norm_constant >= 0, "learner.loss_norm_constant", "must be >= 0")
        require(self.off_policy != "tis" or self.policy_loss == "vanilla", "learner.off_policy",
                "tis weights the vanilla policy gradient: set learner.policy_loss=vanilla (PPO-clip already "
                "takes its ratio against the behaviour policy; decoupled is its truncated-IS variant)")
        require(self.off_policy != "decoupled" or self.policy_loss == "ppo_clip", "learner.off_policy",
                "decoupled needs learner.policy_loss=ppo_clip (use tis with vanilla)")
        require(self.dual_clip == 0 or self.policy_loss == "ppo_clip", "learner.dual_clip",
                "only applies to learner.policy_loss=ppo_clip")
        require(self.num_workers >= 1, "learner.num_workers", "must be >= 1")
        require(self.rank_timeout_s > 0, "learner.rank_timeout_s", "must be > 0")
        require(not self.offload or self.num_workers > 1, "learner.offload", "needs learner.num_workers > 1 (FSDP2)")
        require(not self.offload or device_kind(self.device, self.num_gpus) == "cuda", "learner.offload",
                "is for learners on CUDA (on CPU the policy already lives in host memory)")
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
