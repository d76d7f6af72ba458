"""Reward: every way a sample gets a score, under one contract.

``functions.py`` built-in verifiers and ``load_reward_fn``; ``scores.py`` the one
score validator (every path goes through it); ``worker.py`` ``RewardWorker`` and
``RewardConfig``; ``models.py`` ``RewardModelSpec`` and the local-checkpoint model;
``hf.py`` the one HF sequence-classification wrapper; ``client.py`` the gRPC client
of a remote reward server (retries, circuit breaker); ``server.py`` ``fleetrl reward
serve``. May import ``actors.types``, ``actors.serving``, ``protos``; never ``ray``
or ``actors.runtime``.
"""
