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

import torch

from actors.device import mixed_precision, torch_device, torch_dtype
from actors.rollout.policy import load_policy
from actors.types import Group
from actors.validation import require
from actors.weights.collective import BroadcastSource
from actors.weights.flat import FlatParams, weights_digest
from actors.weights.lora import LoraSpec, adapter_params, base_fingerprint, wrap_for_training
from actors.weights.payload import Payload
from actors.weights.object_store import Put, WeightPublisher
from learner import checkpoint, ranks
from learner.batch import TrainBatch, batch_metrics, empty_step_metrics, pad_micro_batch
from learner.core_algos import aggregate, entropy_from_logits, kl_estimate, logprob_mismatch, token_logprobs
from learner.estimators import ADVANTAGES, POLICY_LOSSES, EstimatorState
from learner.learner_config import LearnerConfig, lr_lambda  # noqa: F401 - re-exported


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
        self.compute_dtype = torch_dtype(cfg.dtype, self.device, sum(p.numel() for p in self.model.parameters()))
        mixed_precision(self.model, self.compute_dtype)
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
        self.total_steps = total_steps
        self.rank, self.world_size = 0, 1  # learner ranks: join_ranks
        self._make_optimizer()
        self.broadcast = BroadcastSource(self.publisher, self.device)
        self.temperature = temperature if temperature > 0 else 1.0
        self.norm_constant = float(cfg.loss_norm_constant or max_new_tokens)
        require(cfg.loss_agg != "seq-mean-token-sum-norm" or self.norm_constant > 0, "learner.loss_norm_constant",
                "set it (> 0) or pass the max completion length")
        self.pad_id = self.tokenizer.pad_token_id
        self.estimator = EstimatorState()
        self.ref_model = None  # with LoRA the reference is the base: the same model, adapters off
        if cfg.kl_coef > 0 and self.lora is None:  # frozen copy of the initial policy
            self.ref_model, _ = load_policy(model_path, device=self.device, dtype="float32")
            mixed_precision(self.ref_model, self.compute_dtype)
            self.ref_model.eval().requires_grad_(False)

    def _make_optimizer(self) -> None:
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=self.cfg.lr, betas=tuple(self.cfg.betas),
                                           eps=self.cfg.eps, weight_decay=self.cfg.weight_decay,
                                           fused=True if self.device.type == "cuda" else None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.cfg, self.total_steps))

    def join_ranks(self, address: str, rank: int, world_size: int) -> None:
        """Become rank ``rank`` of ``world_size`` learner ranks (``learner.ranks``): join their
        process group, shard the policy (and the KL reference) with FSDP2 and rebuild the
        optimizer over the shards. Rank 0 keeps its whole-policy copy (``self.flat``, refreshed
        after every step) to publish; the others drop theirs. Call before any step."""
        require(self.lora is None, "model.lora", "LoRA with learner.num_workers > 1 is not supported yet")
        ranks.init_ranks(address, rank, world_size, self.device, self.cfg.rank_timeout_s)
        self.rank, self.world_size = rank, world_size
        for model in (self.model, self.ref_model):
            if model is not None:
                ranks.shard(model, offload=self.cfg.offload)
        if rank != 0:
            self.flat.buffers = {}
        self._make_optimizer()

    def _refresh_published(self) -> None:
        """Ranks > 1: gather the whole policy into rank 0's ``self.flat`` (every rank calls it)."""
        if self.world_size > 1:
            ranks.copy_into_flat(ranks.full_state(self.model), self.flat if self.rank == 0 else None)

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
        self._refresh_published()
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
        if self.world_size > 1:
            deltas = [d for part in ranks.gather(deltas) for d in part]
        pairs = [torch.cat(x) for x in zip(*deltas)] if deltas else [torch.zeros(0), torch.zeros(0)]
        return {"loss": sum(losses) / len(losses), "grad_norm": grad_norm, "skipped_step": skipped,
                "active_samples": active, **ratio_metrics, **logprob_mismatch(*pairs)}

    def _clip_grad_norm(self) -> float | None:
        """The global gradient norm (clipped to ``max_grad_norm`` when > 0); None when no
        parameter has a gradient (every group of the part had all-equal rewards)."""
        grads = [p for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return None
        if self.world_size > 1:  # DTensor gradients: the norm over every rank's shards
            return float(ranks.to_full(torch.nn.utils.clip_grad_norm_(grads, self.cfg.max_grad_norm or math.inf)))
        if self.cfg.max_grad_norm > 0:
            return float(torch.nn.utils.clip_grad_norm_(grads, self.cfg.max_grad_norm))
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in grads])))

    def advantages(self, batch: TrainBatch) -> torch.Tensor:
        """``[B]`` advantages of the batch with the configured estimator (``learner.advantage``)."""
        return ADVANTAGES[self.cfg.advantage](batch.rewards, batch.group_index, self.cfg, self.estimator)

    @torch.no_grad()
    def sequence_kl(self, batch: TrainBatch) -> torch.Tensor:
        """``[B]``: each sample's summed per-token KL estimate to the reference policy."""
        def kl(idx):
            ids, attn, pos, targets, _, cmask, keep = pad_micro_batch(batch, idx, self.pad_id, self.device)
            _, logp = self._completion_logprobs(self.model, ids, attn, pos, keep, targets)
            ref = self._reference_logprobs(ids, attn, pos, keep, targets)
            return (kl_estimate(logp, ref, self.cfg.kl_estimator) * cmask).sum(-1).cpu().tolist()

        return torch.tensor(self._map_rows(batch, list(range(len(batch))), kl))

    @torch.no_grad()
    def proximal_logprobs(self, batch: TrainBatch) -> list[list[float]]:
        """Log-probs of every completion token under the learner's current weights."""
        def logprobs(idx):
            ids, attn, pos, targets, _, cmask, keep = pad_micro_batch(batch, idx, self.pad_id, self.device)
            _, logp = self._completion_logprobs(self.model, ids, attn, pos, keep, targets)
            return [row[: batch.completion_len(i)] for row, i in zip(logp.cpu().tolist(), idx)]

        return self._map_rows(batch, list(range(len(batch))), logprobs)

    def _my_micro_batches(self, batch: TrainBatch, rows: list[int]) -> list[list[int]]:
        """This rank's micro-batches of ``rows`` (all of them with one rank); every rank gets the
        same count, an empty one where its share ran out (run it as a placeholder pass)."""
        shares = ranks.split_rows(rows, [len(s) for s in batch.sequences], self.world_size)
        mb, mine = self.cfg.micro_batch_size, shares[self.rank]
        return [mine[k * mb:(k + 1) * mb] for k in range(ranks.passes(shares, mb))]

    @staticmethod
    def _placeholder(batch: TrainBatch, rows: list[int]) -> list[int]:
        """The cheapest row to run a placeholder pass on: the shortest."""
        return [min(rows, key=lambda i: len(batch.sequences[i]))]

    def _map_rows(self, batch: TrainBatch, rows: list[int], fn) -> list:
        """``fn(micro-batch rows) -> one value per row`` over ``rows``, split across the ranks."""
        out: dict = {}
        for idx in self._my_micro_batches(batch, rows):
            values = fn(idx or self._placeholder(batch, rows))  # keeps the ranks' collectives paired
            out.update(zip(idx, values) if idx else ())
        if self.world_size > 1:
            out = {k: v for part in ranks.gather(out) for k, v in part.items()}
        return [out[i] for i in rows]

    def _completion_logprobs(self, model, ids, attn, pos, keep, targets):
        """Forward ``model`` computing logits at the columns ``keep`` only (``pad_micro_batch``);
        returns those logits, which predict each completion token, ``[b, T, V]`` and the tokens'
        log-probs ``[b, T]`` at the sampling temperature."""
        pred = model(input_ids=ids, attention_mask=attn, position_ids=pos, logits_to_keep=keep).logits
        if pred.shape[1] != targets.shape[1]:  # a model class that ignores logits_to_keep
            raise RuntimeError(f"{type(model).__name__} returned logits for {pred.shape[1]} positions, not the "
                               f"{targets.shape[1]} asked for: its forward must support logits_to_keep")
        return pred, token_logprobs(pred, targets, temperature=self.temperature)

    @torch.no_grad()
    def _reference_logprobs(self, ids, attn, pos, keep, targets) -> torch.Tensor:
        """``[b, T]`` log-probs of the completion tokens under the KL reference: the frozen initial
        policy, or with LoRA the base model (the same weights with the adapters disabled)."""
        if self.lora is None:
            return self._completion_logprobs(self.ref_model, ids, attn, pos, keep, targets)[1]
        with self.model.disable_adapter():
            return self._completion_logprobs(self.model, ids, attn, pos, keep, targets)[1]

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
        for mine in self._my_micro_batches(batch, rows):
            idx = mine or self._placeholder(batch, rows)  # a pass with loss x 0 keeps the ranks' collectives paired
            ids, attn, pos, targets, old, cmask, keep = pad_micro_batch(batch, idx, self.pad_id, self.device)
            with self._adapter_dropout():
                pred, logp = self._completion_logprobs(self.model, ids, attn, pos, keep, targets)
            if mismatch is not None and mine:
                fresh = torch.tensor([batch.versions[i] == self.policy_version for i in idx], device=cmask.device)
                fresh_tokens = cmask.bool() & fresh.unsqueeze(-1)
                mismatch.append((logp.detach()[fresh_tokens].cpu(), old[fresh_tokens].cpu()))
            norms = dict(num_tokens=num_tokens, num_seqs=num_seqs, norm_constant=self.norm_constant)
            agg = dict(mask=cmask, mode=self.cfg.loss_agg, **norms)
            prox = _pad_rows([proximal[i] for i in idx], like=old) if proximal is not None else None
            loss, m = POLICY_LOSSES[self.cfg.policy_loss](logp, old, adv[idx].to(self.device), cmask, self.cfg,
                                                          dict(loss_agg=self.cfg.loss_agg, **norms), prox)
            if self.cfg.kl_coef > 0 and not self.cfg.kl_in_reward:
                with torch.no_grad():
                    ref_logp = self._reference_logprobs(ids, attn, pos, keep, targets)
                kl = aggregate(kl_estimate(logp, ref_logp, self.cfg.kl_estimator), **agg)
                loss = loss + self.cfg.kl_coef * kl
                m["kl"] = float(kl.detach())
            if self.cfg.entropy_coef > 0:
                ent = aggregate(entropy_from_logits(pred / self.temperature), **agg)
                loss = loss - self.cfg.entropy_coef * ent
                m["entropy"] = float(ent.detach())
            (loss if mine else 0.0 * loss).backward()
            if not mine:
                continue
            loss_total += float(loss.detach())
            w = len(idx) / len(rows)
            for k, v in m.items():
                sums[k] = max(sums.get(k, v), v) if k == "ratio_max" else sums.get(k, 0.0) + w * v
        if self.world_size > 1:  # each rank's terms of the global sums
            parts = ranks.gather((loss_total, sums))
            loss_total, sums = sum(loss for loss, _ in parts), ranks.merge_metrics([p for _, p in parts])
        metrics = {k: sums.get(k) for k in ("clip_frac", "ratio_mean", "ratio_max", "approx_kl", "kl", "entropy",
                                            "is_weight_mean", "is_weight_ess", "is_weight_small")
                   if k in sums or k in ("clip_frac", "ratio_mean", "ratio_max", "approx_kl")}
        return loss_total, len(rows), metrics

    # -- phase 3: sync weights ----------------------------------------------------------------
    def publish_weights(self) -> Payload:
        """Publish the current weights (the actor refuses it after a failed step: ``LearnerActor``)."""
        if self.put_weights is None:
            raise RuntimeError("publish_weights: this learner was built without put_weights "
                               "(actors.runtime.object_store.put)")
        return self.publisher.publish(self.put_weights)

    # -- output ----------------------------------------------------------------------------------
    def save_policy(self, path: str) -> str:
        """The policy as a Hugging Face folder; with LoRA, the adapter in PEFT's format (its
        ``adapter_config.json`` names the base; ``load_policy`` loads it merged)."""
        return self.write_policy(path)

    def write_policy(self, path: str, state: dict | None = None) -> str:
        """``save_policy`` itself (what a checkpoint calls: the actor's ``save_policy`` starts it on
        every rank, and a checkpoint is already running on every rank). ``state``: the ranks'
        gathered policy, when the caller gathered it already."""
        if state is None and self.world_size > 1:
            state = ranks.full_state(self.model)  # a collective: every rank
        if self.rank == 0:
            os.makedirs(path, exist_ok=True)
            if state is None:
                self.model.save_pretrained(path)
            else:
                ranks.save_whole(self.model.config, state, path)
            self.tokenizer.save_pretrained(path)
        return path

    def load_policy_state(self, weights: dict[str, torch.Tensor]):
        """Whole-policy tensors into the (possibly sharded) policy; ``(missing, unexpected)`` keys."""
        if self.world_size == 1:
            return self.model.load_state_dict(weights, strict=False)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        result = set_model_state_dict(self.model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
        self._refresh_published()
        return result

    def save_merged_policy(self, path: str) -> str:
        """LoRA only: the base with the adapters merged, as a plain model folder."""
        import copy

        if self.lora is None:
            raise ValueError("save_merged_policy: this learner trains no adapters (model.lora.rank is 0)")
        os.makedirs(path, exist_ok=True)
        copy.deepcopy(self.model).merge_and_unload().save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        return path

    def save_state(self, path: str, expect_version: int | None = None) -> None:
        """Policy, optimizer, scheduler, RNG, version (``learner.checkpoint``). ``expect_version``:
        the step the checkpoint is for; a learner at another version refuses (a step was queued
        behind the checkpoint, or one is missing)."""
        if expect_version is not None and expect_version != self.policy_version:
            raise RuntimeError(f"checkpoint of step {expect_version} asked of a learner at version "
                               f"{self.policy_version}")
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
