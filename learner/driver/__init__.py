"""The training driver: builds the run's actors and runs sample -> update -> sync.

``trainer.py`` setup and the three phases; ``weight_sync.py`` how a new version
reaches the rollout workers (object store or collective, fallback, newcomers);
``fleet.py`` the rollout actors (start, scale, replace); ``report.py`` metrics
rows, the run summary and peak memory; ``policy.py`` which policy folder to load.
Ray is used freely here.
"""
