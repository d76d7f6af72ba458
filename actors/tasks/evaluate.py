"""Greedy held-out evaluation of a policy on a task's labelled examples."""

from __future__ import annotations

import torch

from actors.reward.functions import exact_match_reward
from actors.tasks.base import Example


@torch.inference_mode()
def greedy_accuracy(model, tokenizer, examples: list[Example], *, max_new_tokens: int, batch_size: int = 256,
                    reward_fn=exact_match_reward) -> float:
    """Mean score of greedy completions of ``examples`` under ``reward_fn`` (a 0/1 verifier
    such as the task's own: the fraction answered correctly)."""
    if not examples:
        raise ValueError("greedy_accuracy needs at least one example")
    was_training = model.training
    model.eval()
    correct = 0.0
    try:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            enc = tokenizer([e.prompt for e in chunk], return_tensors="pt", padding=True).to(model.device)
            out = model.generate(
                **enc,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            correct += sum(reward_fn([e.prompt for e in chunk], texts, answer=[e.answer for e in chunk]))
    finally:
        model.train(was_training)
    return correct / len(examples)
