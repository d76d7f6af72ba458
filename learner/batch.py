"""The learner's view of a batch: trainable samples flattened, and padded micro-batches."""

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
