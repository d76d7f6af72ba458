"""Rollout: the policy generates groups of samples with behaviour log-probs.

``worker.py`` holds ``RolloutWorker`` and ``RolloutConfig``; ``policy.py`` loads
a causal LM and its tokenizer; ``engines/`` holds the generation backends
(``hf.py``: Hugging Face ``generate``). May import ``actors.types``,
``actors.device``, ``actors.weights``; never ``ray`` or ``actors.runtime``.
"""
