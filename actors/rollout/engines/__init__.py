"""Rollout engines: generate ``n`` completions per prompt with per-token behaviour log-probs.

``hf.py`` is Hugging Face ``generate`` (a static batch). A vLLM engine joins it
here. Engines import torch and transformers only (no ``ray``, no ``actors.runtime``).
"""
