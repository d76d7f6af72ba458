"""Rollout engines: generate ``n`` completions per prompt with per-token behaviour log-probs.

``base.py`` is the interface every engine implements (``Engine``, ``Completion``);
``hf.py`` is Hugging Face ``generate`` (a static batch); ``vllm.py`` an in-process
vLLM engine (continuous batching, prefix caching; ``vllm`` imported lazily).
Engines import torch, transformers and vllm only (no ``ray``, no ``actors.runtime``).
"""
