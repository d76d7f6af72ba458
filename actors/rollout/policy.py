"""Loading the policy: a Hugging Face causal LM and its tokenizer, left-padded.

Every component (learner, rollout workers, evaluation) loads the policy
through ``load_policy``, so they all see the same weights and tokenizer.
"""

from __future__ import annotations

import os

import torch


def load_policy(path: str, *, device: torch.device, dtype: str | torch.dtype = "auto"):
    """``from_pretrained`` a causal LM and its tokenizer (left padding)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if not os.path.exists(path) and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise FileNotFoundError(f"model.path: {path!r} does not exist and the hub is offline")
    dtype_arg = dtype if isinstance(dtype, torch.dtype) or dtype == "auto" else getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype_arg).to(device)
    return model, tokenizer
