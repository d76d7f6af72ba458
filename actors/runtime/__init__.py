"""Runtime: the only place in ``actors`` that knows about Ray.

``actors.py`` the torch-free Ray actor classes (reward, reward model,
coordinator) around the plain workers and their ``create_*`` factories;
``rollout_actor.py`` the rollout actor (torch, transformers); ``rollout_loop.py`` the streaming loop one rollout actor
runs; ``placement.py`` bundles, placement-group options, runtime envs, where an
actor runs; ``coordinator.py`` the coordinator (prompt stream, bounded buffer,
weight store; a plain asyncio class made an actor here).
"""
