"""What travels for one weight version, and the store that keeps the newest.

Torch-free on purpose: the coordinator actor holds a ``WeightStore`` and imports
this module without paying for torch (about 1.5 s of every run's start-up).
The version invariant these types take part in is written at the top of
``object_store.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Payload:
    """What travels from the learner to receivers for one version."""

    version: int
    fingerprint: str
    refs: dict[str, Any] = field(default_factory=dict)
    """dtype name -> transport handle (an ObjectRef for the object store); empty when
    the bytes were broadcast to the collective group (``actors.weights.collective``)."""


class WeightStore:
    """Holds the newest payload (and only it). Lives inside the coordinator."""

    def __init__(self):
        self.payload: Payload | None = None

    @property
    def version(self) -> int:
        return self.payload.version if self.payload else 0

    def put(self, payload: Payload) -> None:
        if self.payload is not None and payload.version < self.payload.version:
            raise ValueError(f"weight version went backwards: {payload.version} < {self.payload.version}")
        self.payload = payload  # the previous refs are dropped here, freeing the old version
