"""The learner: turns scored groups into one optimizer step per batch.

A plain class (no Ray): ``learner.actor.create_learner`` makes it a Ray actor.
It holds the policy, its AdamW optimizer and the weight publisher (the version
counter), and, by composition, rank 0 of the collective weight-sync group
(``self.broadcast``). Advantage estimators and policy losses are looked up by
name in ``learner.estimators``; the math is ``learner.core_algos``.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from actors.device import check_device, mixed_precision, torch_device, torch_dtype
from actors.rollout.policy import load_policy
from actors.types import Group
from actors.validation import require
from actors.weights.collective import BroadcastSource
from actors.weights.flat import FlatParams, weights_digest
from actors.weights.lora import LoraSpec, adapter_params, base_fingerprint, wrap_for_training
from actors.weights.payload import Payload
from actors.weights.object_store import Put, WeightPublisher
from learner import checkpoint
from learner.batch import TrainBatch, batch_metrics, empty_step_metrics, pad_micro_batch
from learner.core_algos import aggregate, entropy_from_logits, kl_estimate, logprob_mismatch, token_logprobs
from learner.estimators import ADVANTAGES, POLICY_LOSSES, EstimatorState


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


class Learner:
    """Holds the trained policy, its optimizer and the weight publisher; ``broadcast``
    is its rank-0 role in the collective weight-sync group (``actors.weights.collective``)."""

    def __init__(self, model_path: str, cfg: LearnerConfig, *, total_steps: int, temperature: float = 1.0,
                 seed: int = 0, max_new_tokens: int = 0, publish_dtype: str | None = None,
                 put_weights: Put | None = None, lora: LoraSpec | None = None):
        """``max_new_tokens``: the completion-length limit (the default Dr.GRPO loss constant);
        ``publish_dtype``: the rollout workers' weight dtype (default: the master's, float32);
        ``put_weights``: stores a wire array for ``publish_weights`` (``actors.runtime.object_store.put``);
        ``lora``: train (and publish) LoRA adapters only (``model.lora``)."""
        self.put_weights = put_weights
        torch.set_num_threads(cfg.num_threads)
        torch.manual_seed(seed)
        self.cfg = cfg
        self.device = torch_device(cfg.device, cfg.num_gpus, "learner.device")
        # fp32 master weights; forward passes compute in the configured dtype (autocast)
        self.model, self.tokenizer = load_policy(model_path, device=self.device, dtype="float32")
        mixed_precision(self.model, torch_dtype(cfg.dtype, self.device))
        self.lora = lora if lora is not None and lora.enabled else None
        salt = ""
        if self.lora is not None:  # only the adapters are trained, published and checkpointed
            salt = base_fingerprint(self.model)
            self.model = wrap_for_training(self.model, self.lora)
        # eval mode: no dropout, so the recomputed log-probs match the rollout's
        # (gradients flow all the same)
        self.model.eval()
        # before the optimizer: params keep identity
        self.flat = FlatParams(adapter_params(self.model), salt=salt) if self.lora else FlatParams(self.model)
        self.publisher = WeightPublisher(self.flat, wire_dtype=getattr(torch, publish_dtype) if publish_dtype else None)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, betas=tuple(cfg.betas),
                                           eps=cfg.eps, weight_decay=cfg.weight_decay,
                                           fused=True if self.device.type == "cuda" else None)
        self.broadcast = BroadcastSource(self.publisher, self.device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg, total_steps))
        self.temperature = temperature if temperature > 0 else 1.0
        self.norm_constant = float(cfg.loss_norm_constant or max_new_tokens)
        require(cfg.loss_agg != "seq-mean-token-sum-norm" or self.norm_constant > 0, "learner.loss_norm_constant",
                "set it (> 0) or pass the max completion length")
        self.pad_id = self.tokenizer.pad_token_id
        self.estimator = EstimatorState()
        self.ref_model = None  # with LoRA the reference is the base: the same model, adapters off
        if cfg.kl_coef > 0 and self.lora is None:  # frozen copy of the initial policy
            self.ref_model, _ = load_policy(model_path, device=self.device, dtype="float32")
            mixed_precision(self.ref_model, torch_dtype(cfg.dtype, self.device))
            self.ref_model.eval().requires_grad_(False)

    # -- phase 2 of a training step: update ------------------------------------------------
    @property
    def policy_version(self) -> int:
        return self.publisher.version

    def train_step(self, groups: list[Group], preview: int = 0) -> dict:
        """One optimizer step on the trainable samples of ``groups``; bumps the version.
        ``preview``: also return that many prompt/completion/reward rows (``samples.jsonl``)."""
        t0 = time.perf_counter()
        # a fixed order (by prompt uid), whatever order the groups arrived in: the same
        # batch always gives the same update (exact resume depends on it)
        groups = sorted(groups, key=lambda g: g.prompt.uid)
        batch = TrainBatch.from_groups(groups,
                                       overlong_penalty=self.cfg.overlong_penalty,
                                       filter_equal_groups=self.cfg.filter_equal_groups)
        if len(batch) == 0 and not self.cfg.filter_equal_groups:
            raise ValueError("train_step got no trainable samples")
        lr = self.scheduler.get_last_lr()[0]
        if len(batch) == 0:  # every group filtered: a step without an update
            out = empty_step_metrics(groups)
        else:
            if self.cfg.kl_coef > 0 and self.cfg.kl_in_reward:
                batch.rewards = batch.rewards - self.cfg.kl_coef * self.sequence_kl(batch)
            adv = self.advantages(batch)
            out = self._optimize(batch, adv)
            out.update(batch_metrics(groups, batch, adv, self.publisher.version))
        self.scheduler.step()
        self.publisher.bump()
        return {**out, "lr": lr, "update_s": time.perf_counter() - t0,
                "prompt_uids": [g.prompt.uid for g in groups], **({"preview": preview_rows(groups, preview)}
                                                                  if preview else {})}

    def _optimize(self, batch: TrainBatch, adv: torch.Tensor) -> dict:
        """``ppo_epochs`` passes of ``mini_batches`` optimizer steps over the batch; a part whose
        gradient is not finite is skipped (the weights are never touched by it)."""
        proximal = self.proximal_logprobs(batch) if self.cfg.off_policy == "decoupled" else None
        parts = [p for p in (list(range(len(batch)))[i::self.cfg.mini_batches]
                             for i in range(self.cfg.mini_batches)) if p]
        losses, skipped, active, grad_norm = [], 0, 0, 0.0
        deltas: list[tuple[torch.Tensor, torch.Tensor]] = []  # (learner, engine) log-probs of fresh tokens
        for epoch in range(self.cfg.ppo_epochs):
            for j, part in enumerate(parts):
                self.optimizer.zero_grad(set_to_none=True)
                # only the first forward of a step sees the weights that produced this version's samples
                loss, n_active, ratio_metrics = self.accumulate_gradients(
                    batch, adv, rows=part, proximal=proximal, mismatch=deltas if epoch == j == 0 else None)
                losses.append(loss)
                active = max(active, n_active)
                norm = self._clip_grad_norm()
                grad_norm = 0.0 if norm is None else norm
                if not math.isfinite(grad_norm):  # never let a non-finite gradient touch the weights
                    skipped += 1
                elif norm is not None:
                    self.optimizer.step()
        pairs = [torch.cat(x) for x in zip(*deltas)] if deltas else [torch.zeros(0), torch.zeros(0)]
        return {"loss": sum(losses) / len(losses), "grad_norm": grad_norm, "skipped_step": skipped,
                "active_samples": active, **ratio_metrics, **logprob_mismatch(*pairs)}

    def _clip_grad_norm(self) -> float | None:
        """The global gradient norm (clipped to ``max_grad_norm`` when > 0); None when no
        parameter has a gradient (every group of the part had all-equal rewards)."""
        grads = [p for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return None
        if self.cfg.max_grad_norm > 0:
            return float(torch.nn.utils.clip_grad_norm_(grads, self.cfg.max_grad_norm))
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in grads])))

    def advantages(self, batch: TrainBatch) -> torch.Tensor:
        """``[B]`` advantages of the batch with the configured estimator (``learner.advantage``)."""
        return ADVANTAGES[self.cfg.advantage](batch.rewards, batch.group_index, self.cfg, self.estimator)

    @torch.no_grad()
    def sequence_kl(self, batch: TrainBatch) -> torch.Tensor:
        """``[B]``: each sample's summed per-token KL estimate to the reference policy."""
        out = []
        mb = self.cfg.micro_batch_size
        for start in range(0, len(batch), mb):
            idx = list(range(start, min(start + mb, len(batch))))
            ids, attn, pos, targets, _, cmask, pred_pos = pad_micro_batch(batch, idx, self.pad_id, self.device)
            _, logp = self._completion_logprobs(self.model, ids, attn, pos, pred_pos, targets)
            ref = self._reference_logprobs(ids, attn, pos, pred_pos, targets)
            out.append((kl_estimate(logp, ref, self.cfg.kl_estimator) * cmask).sum(-1).cpu())
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
            out += [row[: batch.completion_len(i)] for row, i in zip(logp.cpu().tolist(), idx)]
        return out

    def _completion_logprobs(self, model, ids, attn, pos, pred_pos, targets):
        """Forward ``model``; returns the logits that predict each completion token
        ``[b, T, V]`` and the tokens' log-probs ``[b, T]`` at the sampling temperature."""
        logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits
        pred = logits.gather(1, pred_pos.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        return pred, token_logprobs(pred, targets, temperature=self.temperature)

    @torch.no_grad()
    def _reference_logprobs(self, ids, attn, pos, pred_pos, targets) -> torch.Tensor:
        """``[b, T]`` log-probs of the completion tokens under the KL reference: the frozen initial
        policy, or with LoRA the base model (the same weights with the adapters disabled)."""
        if self.lora is None:
            return self._completion_logprobs(self.ref_model, ids, attn, pos, pred_pos, targets)[1]
        with self.model.disable_adapter():
            return self._completion_logprobs(self.model, ids, attn, pos, pred_pos, targets)[1]

    @contextlib.contextmanager
    def _adapter_dropout(self):
        """``model.lora.dropout`` in the gradient passes only (the policy stays in eval mode)."""
        drops = [m for n, m in self.model.named_modules() if "lora_dropout" in n and isinstance(m, torch.nn.Dropout)]
        for m in drops:
            m.train()
        try:
            yield
        finally:
            for m in drops:
                m.eval()

    def accumulate_gradients(self, batch: TrainBatch, adv: torch.Tensor, *, skip_zero_advantage: bool | None = None,
                             rows: list[int] | None = None, proximal: list[list[float]] | None = None,
                             mismatch: list | None = None):
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

        ``mismatch``: a list that receives ``(learner, engine)`` log-probs of the tokens of the
        samples generated with the current ``policy_version`` (before any update of this step).
        """
        part = list(range(len(batch))) if rows is None else rows
        num_tokens = float(sum(batch.policy_tokens(i) for i in part))
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
            with self._adapter_dropout():
                pred, logp = self._completion_logprobs(self.model, ids, attn, pos, pred_pos, targets)
            if mismatch is not None:
                fresh = torch.tensor([batch.versions[i] == self.policy_version for i in idx], device=cmask.device)
                keep = cmask.bool() & fresh.unsqueeze(-1)
                mismatch.append((logp.detach()[keep].cpu(), old[keep].cpu()))
            norms = dict(num_tokens=num_tokens, num_seqs=num_seqs, norm_constant=self.norm_constant)
            agg = dict(mask=cmask, mode=self.cfg.loss_agg, **norms)
            prox = _pad_rows([proximal[i] for i in idx], like=old) if proximal is not None else None
            loss, m = POLICY_LOSSES[self.cfg.policy_loss](logp, old, adv[idx].to(self.device), cmask, self.cfg,
                                                          dict(loss_agg=self.cfg.loss_agg, **norms), prox)
            if self.cfg.kl_coef > 0 and not self.cfg.kl_in_reward:
                with torch.no_grad():
                    ref_logp = self._reference_logprobs(ids, attn, pos, pred_pos, targets)
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

    # -- phase 3: sync weights ----------------------------------------------------------------
    def publish_weights(self, after_update: dict | None = None) -> Payload:
        """Publish the current weights. ``after_update`` is the result of the
        ``train_step`` this publish follows: passed as an object ref it makes the
        publish depend on that step (a failed step publishes nothing)."""
        if self.put_weights is None:
            raise RuntimeError("publish_weights: this learner was built without put_weights "
                               "(actors.runtime.object_store.put)")
        return self.publisher.publish(self.put_weights)

    # -- output ----------------------------------------------------------------------------------
    def save_policy(self, path: str) -> str:
        """The policy as a Hugging Face folder; with LoRA, the adapter in PEFT's format (its
        ``adapter_config.json`` names the base; ``load_policy`` loads it merged)."""
        os.makedirs(path, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        return path

    def save_merged_policy(self, path: str) -> str:
        """LoRA only: the base with the adapters merged, as a plain model folder."""
        import copy

        if self.lora is None:
            raise ValueError("save_merged_policy: this learner trains no adapters (model.lora.rank is 0)")
        os.makedirs(path, exist_ok=True)
        copy.deepcopy(self.model).merge_and_unload().save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        return path

    def save_state(self, path: str) -> None:
        """Policy, optimizer, scheduler, RNG, version (``learner.checkpoint``)."""
        checkpoint.save_learner_state(self, path)

    def load_state(self, path: str) -> int:
        """Load what ``save_state`` wrote; returns the restored ``policy_version``."""
        return checkpoint.load_learner_state(self, path)

    def param_vector(self) -> torch.Tensor:
        """A copy of all parameters (tests compare weights across components)."""
        return torch.cat([b.detach().float().cpu().reshape(-1) for b in self.flat.buffers.values()])

    def weights_digest(self) -> str:
        """Of the weights as published (the cast the rollout workers hold)."""
        return weights_digest(self.publisher.wire())


def _pad_rows(rows: list[list[float]], *, like: torch.Tensor) -> torch.Tensor:
    """Per-row lists of per-token values, zero-padded to ``like``'s ``[b, T]``."""
    out = torch.zeros_like(like)
    for b, row in enumerate(rows):
        out[b, : len(row)] = torch.tensor(row)
    return out


def preview_rows(groups: list[Group], n: int) -> list[dict]:
    """The first sample of the first ``n`` groups as readable rows (``samples.jsonl``)."""
    rows = []
    for g in groups[:n]:
        s = g.samples[0] if g.samples else None
        if s is not None:
            rows.append({"prompt": g.prompt.text, "completion": s.completion_text, "reward": s.reward,
                         "rewards": dict(s.rewards), "policy_version": s.policy_version})
    return rows
