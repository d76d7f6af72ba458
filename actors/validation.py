"""The one validation helper every config section uses, and its one exception type.

``require(ok, key, msg)`` raises ``ConfigError("key: msg")``: every message
names the offending key first (``learner.lr: must be > 0``). It lives at the
bottom of the import order so worker configs (``RolloutConfig``,
``RewardConfig``) and the learner's sections share it.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the key."""


def require(ok: bool, key: str, msg: str) -> None:
    """Raise ``ConfigError(f"{key}: {msg}")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def check_resources(key: str, resources: dict[str, float]) -> None:
    """Custom Ray resources: names without spaces, finite amounts >= 0."""
    for name, amount in resources.items():
        require(bool(name) and not any(c.isspace() for c in str(name)), key, f"resource name {name!r} is invalid")
        require(isinstance(amount, (int, float)) and amount >= 0 and amount == amount and amount != float("inf"),
                key, f"{name}: {amount!r} must be a finite number >= 0")
