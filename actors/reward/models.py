"""Reward models registered while a run trains: their spec, and the local-checkpoint model.

``RewardModelSpec`` describes one model (a remote ``fleetrl.reward.v1`` server
or a local HF sequence-classification folder); ``make_reward_model`` builds the
object a ``RewardModelActor`` holds: a ``RemoteRewardClient`` (``client.py``)
or a ``LocalRewardModel``. Both score with the same interface and counters,
and their results are per sample a validated score or the reason there is none.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from actors.reward.client import RemoteRewardClient, RewardStats, Result
from actors.reward.hf import HFRewardModel
from actors.reward.scores import validate_scores


@dataclass(kw_only=True)
class RewardModelSpec:
    """One reward model registered at run time: a remote server (``endpoint``) or a local
    HF checkpoint (``checkpoint_dir``), and how the run uses it."""

    name: str
    endpoint: str = ""
    """host:port of a fleetrl.reward.v1.RewardModel server."""
    checkpoint_dir: str = ""
    """Local HF sequence-classification folder (safetensors only)."""
    weight: float = 1.0
    timeout_s: float = 10.0
    batch_size: int = 64
    token_file: str | None = None
    token: str | None = field(default=None, repr=False)
    """Bearer token for the reward server, resolved by the driver from
    $FLEETRL_REWARD_TOKEN / $FLEETRL_REWARD_TOKEN_FILE (never the Control token)."""
    tls_ca: str | None = None
    max_attempts: int = 3
    failure_threshold: int = 3
    cooldown_s: float = 2.0


class LocalRewardModel:
    """A local HF sequence-classification reward model with the client's interface."""

    def __init__(self, spec: RewardModelSpec):
        self.spec = spec
        self.model = HFRewardModel(spec.checkpoint_dir, batch_size=spec.batch_size)
        self.stats = RewardStats()

    def close(self) -> None:
        pass

    def info(self) -> dict:
        return {"healthy": True, **self.stats.snapshot()}

    def probe(self) -> dict:
        return {"name": self.spec.name, "version": self.model.version, "kind": self.model.kind,
                "max_batch_size": self.spec.batch_size}

    def score(self, prompts: list[str], completions: list[str], metadata: dict[str, list]) -> Result:
        try:
            result = validate_scores(self.spec.name, self.model.score(prompts, completions, **metadata), len(prompts))
        except Exception as e:  # noqa: BLE001 - a model failure flags the samples
            result = [f"reward_error: {self.spec.name!r} raised {type(e).__name__}: {e}"] * len(prompts)
        if all(not isinstance(r, str) for r in result):
            self.stats.ok(result)
        else:
            self.stats.fail(len(prompts), next(r for r in result if isinstance(r, str)))
        return result


def make_reward_model(spec: RewardModelSpec):
    return LocalRewardModel(spec) if spec.checkpoint_dir else RemoteRewardClient(spec)
