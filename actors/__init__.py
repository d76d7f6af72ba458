"""Rollout, reward and coordination workers of fleetrl.

Workers are plain classes (``RolloutWorker``, ``RewardWorker``,
``Coordinator``); ``actors.group`` is the one module that turns them into Ray
actors. Nothing here imports ``learner``.
"""
