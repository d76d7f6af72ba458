"""Reward models registered while a run trains: their spec, and the local-checkpoint model.

``RewardModelSpec`` describes one model (a remote ``fleetrl.reward.v1`` server
or a local HF sequence-classification folder); ``make_reward_model`` builds the
object a ``RewardModelActor`` holds: a ``RemoteRewardClient`` (``client.py``)
or a ``LocalRewardModel``. Both score a ``ScoreBatch`` with the same counters,
and both validate their scores (``scores.validate_scores``) before returning
them: per sample a finite score or the ``Excluded`` reason there is none.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from actors.reward.client import RemoteRewardClient, RewardStats
from actors.reward.hf import HFRewardModel
from actors.reward.scores import Result, ScoreBatch, raised, validate_scores


@dataclass(kw_only=True)
class RewardModelSpec:
    """One reward model registered at run time: a remote server (``endpoint``) or a local
    HF checkpoint (``checkpoint_dir``), and how the run uses it. Every field is settable
    through Control (``protos/control.proto``) and ``fleetrl reward add``, except the
    token, which the driver resolves."""

    name: str
    endpoint: str = ""
    """host:port of a fleetrl.reward.v1.RewardModel server."""
    checkpoint_dir: str = ""
    """Local HF sequence-classification folder (safetensors only)."""
    weight: float = 1.0
    timeout_s: float = 10.0
    """Deadline of one Score call, retries included."""
    batch_size: int = 64
    token: str | None = field(default=None, repr=False)
    """Bearer token for the reward server, resolved by the driver from
    $FLEETRL_REWARD_TOKEN / $FLEETRL_REWARD_TOKEN_FILE (never the Control token)."""
    tls_ca: bytes | None = None
    """PEM CA certificate(s) to verify the server's TLS certificate; None = plaintext."""
    max_attempts: int = 3
    """Tries per Score call (retries only on UNAVAILABLE)."""
    failure_threshold: int = 3
    """Consecutive failed calls that open the circuit (the model is then unhealthy)."""
    cooldown_s: float = 2.0
    """How long an open circuit fails fast before one trial call."""


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

    def trial(self) -> bool:
        """No circuit: a local model is always called (see ``RemoteRewardClient.trial``)."""
        return True

    def probe(self) -> dict:
        """The model's metadata; raises ``ProbeError`` (picklable, one line) if the loaded
        checkpoint cannot score a sample."""
        from actors.reward.client import ProbeError

        try:
            self.model.score(["probe"], [""])
        except Exception as e:  # noqa: BLE001 - any failure means the model is not usable
            raise ProbeError(type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "") from None
        return {"name": self.spec.name, "version": self.model.version, "kind": self.model.kind,
                "max_batch_size": self.spec.batch_size}

    def score(self, batch: ScoreBatch) -> Result:
        """Scores the text (the checkpoint has its own tokenizer; token ids are not used)."""
        try:
            result = validate_scores(self.spec.name, self.model.score(batch.prompts, batch.completions,
                                                                      **batch.metadata), len(batch))
        except Exception as e:  # noqa: BLE001 - a model failure flags the samples
            result = raised(self.spec.name, e, len(batch))
        self.stats.record(result)
        return result


def make_reward_model(spec: RewardModelSpec):
    return LocalRewardModel(spec) if spec.checkpoint_dir else RemoteRewardClient(spec)
