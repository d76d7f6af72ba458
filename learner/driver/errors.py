"""Why a run ends early: the exceptions the driver raises and the CLI turns into one line."""

from __future__ import annotations

RESTARTABLE = ("learner", "coordinator")
"""Components whose death ``train.max_restarts`` recovers from (new actors, newest checkpoint)."""


class RunFailed(RuntimeError):
    """The run cannot continue (a worker died, no samples arrive, ...). ``component`` names
    the part that failed when one did (``learner``, ``coordinator``, ``reward-0``, ...)."""

    def __init__(self, message: str, *, component: str = ""):
        super().__init__(message)
        self.component = component

    @property
    def restartable(self) -> bool:
        return self.component in RESTARTABLE


class StopRequested(Exception):
    """``stop_requested`` was set while the driver waited for a batch."""
