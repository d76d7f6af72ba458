"""The Hugging Face ``generate`` engine: one static batch of ``n`` copies per prompt.

``HFEngine.generate`` takes prompt token ids and returns, per prompt, ``n``
completions with their per-token behaviour log-probs (the sampling
distribution after temperature, before top-p truncation; see the README
glossary) and whether each stopped at EOS.
"""

from __future__ import annotations

from typing import Iterable

import torch

from actors.rollout.engines.base import Completion


class HFEngine:
    """Generates with ``model.generate`` on the policy the rollout worker holds.

    The model's parameters are views into the worker's flat buffers, so a weight
    payload copied into those buffers is already loaded: ``load_weights`` is a no-op."""

    name = "hf"

    def __init__(self, model, tokenizer, *, device: torch.device):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.context = getattr(model.config, "max_position_embeddings", None) or 1 << 30

    def load_weights(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Nothing to do: the parameters are the flat buffers the payload was copied into."""

    def info(self) -> dict:
        dtype = next(self.model.parameters()).dtype
        return {"engine": self.name, "device": str(self.device), "dtype": str(dtype).removeprefix("torch.")}

    @torch.inference_mode()
    def generate(self, prompt_ids: list[list[int]], *, n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int) -> list[list[Completion]]:
        """``n`` completions per prompt (``[len(prompt_ids)][n]``); sampling is seeded by ``seed``
        alone, so the same prompts, weights and seed draw the same samples on any worker."""
        tok = self.tokenizer
        torch.manual_seed(seed)
        width = max(len(x) for x in prompt_ids)
        pad = tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in prompt_ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in prompt_ids], device=self.device)
        greedy = temperature == 0
        # each prompt repeated n times in a row (works for greedy too, unlike num_return_sequences)
        out = self.model.generate(
            input_ids=input_ids.repeat_interleave(n, dim=0),
            attention_mask=mask.repeat_interleave(n, dim=0),
            do_sample=not greedy,
            temperature=None if greedy else temperature,
            top_p=None if greedy else top_p,
            top_k=None,
            max_new_tokens=max_new_tokens,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=pad,
            eos_token_id=tok.eos_token_id,
        )
        gen = out.sequences[:, width:]  # [P*n, T]
        logits = torch.stack(out.logits, dim=1).float()  # [P*n, T, V] raw (pre-processing) logits
        if not greedy and temperature != 1.0:
            logits = logits / temperature
        logp = torch.log_softmax(logits, dim=-1).gather(-1, gen.unsqueeze(-1)).squeeze(-1)
        eos = tok.eos_token_id
        gen_l, logp_l = gen.tolist(), logp.tolist()
        result = []
        for j in range(len(prompt_ids)):
            row = []
            for k in range(j * n, (j + 1) * n):
                toks = gen_l[k]
                length = toks.index(eos) + 1 if eos in toks else len(toks)
                toks = toks[:length]
                row.append(Completion(ids=toks, logprobs=logp_l[k][:length], finished=bool(toks) and toks[-1] == eos))
            result.append(row)
        return result
