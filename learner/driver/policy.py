"""Which policy folder every component loads: the user's ``model.path``, or the built-in one."""

from __future__ import annotations

import os
from pathlib import Path

from actors.models.tiny import prepare_builtin_policy
from learner.config import Config, ConfigError


def resolve_policy(cfg: Config) -> tuple[str, dict]:
    """The policy folder to load everywhere, building the built-in one if needed."""
    if cfg.model.path:
        from transformers import AutoConfig

        try:
            AutoConfig.from_pretrained(cfg.model.path)
        except Exception as e:  # noqa: BLE001 - surface any loader error with the key name
            raise ConfigError(f"model.path: cannot load {cfg.model.path!r}: {type(e).__name__}: {e}") from None
        if os.path.isdir(cfg.model.path):  # actors need not share the driver's working directory
            return str(Path(cfg.model.path).resolve()), {}
        return cfg.model.path, {}
    if cfg.task.name != "reverse":
        raise ConfigError(f"task.name: {cfg.task.name!r} needs a pretrained policy in model.path (the built-in tiny "
                          f"policy is warm-started for reverse only), e.g. `fleetrl model prepare smollm2 DIR`")
    path, info = prepare_builtin_policy(
        task_name=cfg.task.name, num_digits=cfg.task.num_digits, seed=cfg.task.seed,
        labelled_examples=cfg.model.warm_start_examples, target_accuracy=cfg.model.warm_start_target,
        max_steps=cfg.model.warm_start_max_steps, hidden_size=cfg.model.hidden_size, num_layers=cfg.model.num_layers)
    return str(path), info
