"""The learner's view of a batch: trainable samples flattened, padded micro-batches, and the
metrics of what one update trained on."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from actors.types import Group


@dataclass
class TrainBatch:
    """Trainable samples of a list of groups, flattened (one row per sample)."""

    sequences: list[list[int]]  # prompt + completion ids
    prompt_lens: list[int]
    behaviour_logprobs: list[list[float]]
    rewards: torch.Tensor  # [B]
    group_index: torch.Tensor  # [B]
    versions: list[int]
    loss_masks: list[list[int] | None] | None = None
    """Per row: 1 = a policy token (trained on), 0 = an environment's observation token (context
    only); None for a row (or the batch) = every completion token is the policy's."""

    @classmethod
    def from_groups(cls, groups: list[Group], *, overlong_penalty: float = 0.0,
                    filter_equal_groups: bool = False) -> "TrainBatch":
        """``overlong_penalty`` is subtracted from the reward of samples cut at
        max_new_tokens (no EOS); ``filter_equal_groups`` leaves out groups whose
        rewards (after the penalty) are all equal: they carry no group-relative signal."""
        seqs, plens, lps, rewards, gidx, versions, masks = [], [], [], [], [], [], []
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
                masks.append(s.loss_mask)
            gi += 1
        return cls(seqs, plens, lps, torch.tensor(rewards, dtype=torch.float32),
                   torch.tensor(gidx, dtype=torch.long), versions,
                   masks if any(m is not None for m in masks) else None)

    def __len__(self) -> int:
        return len(self.sequences)

    def completion_len(self, i: int) -> int:
        """Tokens after row ``i``'s prompt (an episode's observations included)."""
        return len(self.sequences[i]) - self.prompt_lens[i]

    def mask(self, i: int) -> list[int] | None:
        return self.loss_masks[i] if self.loss_masks is not None else None

    def policy_tokens(self, i: int) -> int:
        """Row ``i``'s tokens that are trained on (the loss normalisers count these)."""
        m = self.mask(i)
        return self.completion_len(i) if m is None else sum(m)


def pad_micro_batch(batch: TrainBatch, idx: list[int], pad_id: int, device):
    """Padded tensors for rows ``idx``, every prompt ending in the same column ``P - 1`` (prompts
    padded on the left, completions on the right): input_ids/attention/positions ``[b, L]``;
    completion targets, behaviour log-probs and mask ``[b, T]``; ``keep`` ``[T]``: the columns
    ``P - 1 .. P + T - 2`` whose logits predict the completion tokens, the same for every row,
    so the forward computes logits there only (``logits_to_keep``), never ``[b, L, V]``. The mask
    is the rows' loss mask: 0 on padding and on an episode's observation tokens."""
    rows = [batch.sequences[i] for i in idx]
    P = max(batch.prompt_lens[i] for i in idx)
    T = max(len(r) - batch.prompt_lens[i] for r, i in zip(rows, idx))
    input_ids = torch.full((len(rows), P + T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), P + T), dtype=torch.long)
    targets = torch.full((len(rows), T), pad_id, dtype=torch.long)
    old = torch.zeros((len(rows), T), dtype=torch.float32)
    cmask = torch.zeros((len(rows), T), dtype=torch.float32)
    for b, (r, i) in enumerate(zip(rows, idx)):
        p, c = batch.prompt_lens[i], len(r) - batch.prompt_lens[i]
        input_ids[b, P - p: P + c] = torch.tensor(r)
        attn[b, P - p: P + c] = 1
        targets[b, :c] = torch.tensor(r[p:])
        old[b, :c] = torch.tensor(batch.behaviour_logprobs[i])
        m = batch.mask(i)
        cmask[b, :c] = 1 if m is None else torch.tensor(m, dtype=torch.float32)
    positions = (attn.cumsum(-1) - 1).clamp(min=0)
    keep = torch.arange(P - 1, P - 1 + T)
    return (input_ids.to(device), attn.to(device), positions.to(device), targets.to(device), old.to(device),
            cmask.to(device), keep.to(device))


def _mean_reward(groups: list[Group]) -> float:
    rs = [s.reward for g in groups for s in g.trainable_samples()]
    return sum(rs) / len(rs) if rs else 0.0


def _fraction_all_equal(rewards: torch.Tensor, group_index: torch.Tensor) -> float:
    groups = group_index.unique()
    same = sum(1 for g in groups if rewards[group_index == g].unique().numel() == 1)
    return same / max(1, len(groups))


def batch_metrics(groups: list[Group], batch: TrainBatch, adv: torch.Tensor, version: int) -> dict:
    """What one update trained on (``version``: the learner's before the update)."""
    num_tokens = sum(batch.policy_tokens(i) for i in range(len(batch)))
    stale = [version - v for v in batch.versions]
    per_name: dict[str, list[float]] = {}
    for g in groups:
        for s in g.trainable_samples():
            for name, r in s.rewards.items():
                per_name.setdefault(name, []).append(r)
    return {
        "reward_mean": float(batch.rewards.mean()),
        "reward_std": float(batch.rewards.std()) if len(batch) > 1 else 0.0,
        "adv_abs_mean": float(adv.abs().mean()),
        "zero_adv_group_frac": _fraction_all_equal(batch.rewards, batch.group_index),
        # samples consumed (trained on, or filtered out by filter_equal_groups)
        "samples": sum(len(g.trainable_samples()) for g in groups),
        "filtered_groups": len(groups) - int(batch.group_index.max()) - 1,
        "tokens": num_tokens, "sequence_tokens": sum(len(s) for s in batch.sequences),
        "response_len_mean": num_tokens / len(batch),
        "staleness_mean": sum(stale) / len(stale), "staleness_max": max(stale),
        "behaviour_versions": sorted(set(batch.versions)),
        "reward_by_name": {name: sum(v) / len(v) for name, v in per_name.items()},
        **episode_metrics(groups),
    }


EPISODE_COUNTERS = ("tool_calls", "tool_errors", "malformed_calls")


def episode_metrics(groups: list[Group]) -> dict:
    """Multi-turn episodes among the step's samples (trained or not): how many, their turns,
    tool calls and errors, and observation vs policy tokens. Empty for single-turn samples."""
    episodes = [s for g in groups for s in g.samples if s.loss_mask is not None]
    if not episodes:
        return {}
    out = {"episodes": len(episodes), "turns_mean": sum(s.turns for s in episodes) / len(episodes),
           "policy_tokens": sum(s.policy_tokens for s in episodes),
           "observation_tokens": sum(len(s.completion_ids) - s.policy_tokens for s in episodes)}
    for key in EPISODE_COUNTERS:  # an environment's finish() may say anything: only numbers count
        out[key] = sum(v for s in episodes if isinstance(v := s.metadata.get(key, 0), (int, float))
                       and not isinstance(v, bool))
    return out


def empty_step_metrics(groups: list[Group]) -> dict:
    """A step whose every group was filtered out (``filter_equal_groups``): nothing trained."""
    return {"loss": 0.0, "grad_norm": 0.0, "skipped_step": 0, "clip_frac": None, "ratio_mean": None,
            "ratio_max": None, "approx_kl": None, "reward_mean": _mean_reward(groups), "reward_std": 0.0,
            "adv_abs_mean": 0.0, "zero_adv_group_frac": 1.0,
            "samples": sum(len(g.trainable_samples()) for g in groups), "active_samples": 0, "tokens": 0,
            "sequence_tokens": 0, "response_len_mean": 0.0, "staleness_mean": 0.0, "staleness_max": 0,
            "behaviour_versions": [], "reward_by_name": {}, "filtered_groups": len(groups),
            "mismatch_abs_mean": None, "mismatch_abs_max": None, "mismatch_ratio_std": None, "mismatch_tokens": 0,
            **episode_metrics(groups)}
