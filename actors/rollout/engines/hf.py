"""The Hugging Face ``generate`` engine: one static batch of ``n`` copies per prompt.

``HFEngine.generate`` takes prompt token ids and returns, per prompt, ``n``
completions with their per-token behaviour log-probs (the sampling
distribution after temperature, before top-p truncation; see the README
glossary) and whether each stopped at EOS.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from actors.rollout.engines.base import Completion


class HFEngine:
    """Generates with ``model.generate`` on the policy the rollout worker holds.

    The model's parameters are views into the worker's flat buffers, so a weight
    payload copied into those buffers is already loaded: ``load_weights`` is a no-op."""

    name = "hf"

    def __init__(self, model, tokenizer, *, device: torch.device):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.context = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        # sampling as fleetrl asks, not the folder's generation_config.json (a repetition penalty or
        # suppressed tokens there would change the distribution sampled from, but not the learner's
        # recompute of its log-probs); the vLLM engine does the same (generation_config="vllm")
        model.generation_config = GenerationConfig(pad_token_id=tokenizer.pad_token_id,
                                                   eos_token_id=tokenizer.eos_token_id)

    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Nothing to do: the parameters are the flat buffers the payload was copied into."""

    def info(self) -> dict:
        dtype = next(self.model.parameters()).dtype
        return {"engine": self.name, "device": str(self.device), "dtype": str(dtype).removeprefix("torch.")}

    @torch.inference_mode()
    def generate(self, prompt_ids: list[list[int]], *, n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int, stop: Sequence[str] = ()) -> list[list[Completion]]:
        """``n`` completions per prompt (``[len(prompt_ids)][n]``); sampling is seeded by ``seed``
        alone, so the same prompts, weights and seed draw the same samples on any worker."""
        tok = self.tokenizer
        torch.manual_seed(seed)
        width = max(len(x) for x in prompt_ids)
        pad = tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in prompt_ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in prompt_ids], device=self.device)
        greedy = temperature == 0
        record = BehaviourLogprobs(1.0 if greedy else temperature)
        # each prompt repeated n times in a row (works for greedy too, unlike num_return_sequences)
        out = self.model.generate(
            input_ids=input_ids.repeat_interleave(n, dim=0),
            attention_mask=mask.repeat_interleave(n, dim=0),
            do_sample=not greedy,
            temperature=None if greedy else temperature,
            top_p=None if greedy else top_p,
            top_k=None,
            max_new_tokens=max_new_tokens,
            logits_processor=LogitsProcessorList([record]),
            pad_token_id=pad,
            eos_token_id=tok.eos_token_id,
            **({"stop_strings": list(stop), "tokenizer": tok} if stop else {}),
        )
        gen = out[:, width:]  # [P*n, T]
        logp = record.finish(gen)  # [P*n, T]
        eos = tok.eos_token_id
        gen_l, logp_l = gen.tolist(), logp.tolist()
        result = []
        for j in range(len(prompt_ids)):
            row = []
            for k in range(j * n, (j + 1) * n):
                toks = gen_l[k]
                length = toks.index(eos) + 1 if eos in toks else len(toks)
                at_stop = stop_point(tok, toks[:length], stop) if stop else None
                toks = toks[:at_stop or length]
                row.append(Completion(ids=toks, logprobs=logp_l[k][:len(toks)],
                                      finished=bool(toks) and toks[-1] == eos and at_stop is None,
                                      stopped=at_stop is not None))
            result.append(row)
        return result


def stop_point(tokenizer, ids: list[int], stop: Sequence[str]) -> int | None:
    """The length of the shortest prefix of ``ids`` whose text contains a stop string, or None.
    (``generate`` pads a row once its stop string is complete; this finds where that was.)"""
    if not any(s in tokenizer.decode(ids) for s in stop):
        return None
    for end in range(1, len(ids) + 1):
        if any(s in tokenizer.decode(ids[:end]) for s in stop):
            return end
    return None


class BehaviourLogprobs(LogitsProcessor):
    """Records each sampled token's log-prob under ``softmax(logits / temperature)`` while
    ``generate`` runs, keeping one step's ``[B, V]`` distribution at a time.

    Custom processors run before generate's temperature and top-p warpers, so ``scores``
    are the model's logits. Step ``t``'s token is only known at step ``t + 1`` (it is the
    last column of ``input_ids`` then), so each call gathers the previous step's token and
    ``finish`` gathers the last one. ``output_logits=True`` kept every step's logits
    instead: ``[B, T, V]`` fp32, 6.4 GB for 128 sequences x 256 tokens of a 49k vocabulary
    (and as much again to stack them)."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.previous: torch.Tensor | None = None  # [B, V] log-softmax of the last step seen
        self.steps: list[torch.Tensor] = []  # [B] per generated token but the last

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.previous is not None:
            self.steps.append(self.previous.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, generated: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` log-probs of ``generated`` (the ``T`` new tokens of every row)."""
        if self.previous is not None and generated.shape[1] > len(self.steps):
            self.steps.append(self.previous.gather(-1, generated[:, len(self.steps):len(self.steps) + 1]).squeeze(-1))
        self.previous = None
        if not self.steps:
            return torch.zeros(generated.shape, dtype=torch.float32)
        return torch.stack(self.steps, dim=1)
