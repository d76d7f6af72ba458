"""Versioned weight broadcast from the learner to rollout workers.

Both sides keep the policy's parameters inside **one contiguous flat buffer per
dtype** (``FlatParams`` rebinds every parameter as a view into it). Publishing
is then a single ``ray.put`` of that buffer as a numpy array; every reader on
the node maps the same object-store copy and does one ``flat.copy_`` into its
own buffer. N readers cost one serialisation, not N (a plain
``ray.put(state_dict)`` pickles through ``torch.save``; README, Benchmarks).

Invariant (what every other component may rely on):

1. The learner's ``policy_version`` equals the number of learner steps taken
   (a step whose gradient is not finite leaves the weights untouched but
   still counts); a payload published under version ``v`` holds exactly the
   weights after ``v`` steps.
2. The store (``actors.weights.payload.WeightStore``) keeps only the newest payload; the versions it
   hands out never decrease.
3. A receiver's ``policy_version`` is ``v`` iff its parameters are bit-for-bit
   the payload of ``v``: a payload is checked (layout fingerprint, sizes)
   before any byte is copied, and applied whole.
4. Receivers apply weights only *between* generate calls, so every sample is
   tagged with the version of the weights that generated all of its tokens.

Transport: the object store (one node or many; Ray copies an object once per
node). This module is pure torch/numpy: the two Ray calls (``put``, ``fetch``)
are ``actors.runtime.object_store``, handed in by the actors. The collective
transport (``actors.weights.collective``: a ``torch.distributed`` broadcast from
the learner, rank 0, to the rollout workers; NCCL between GPUs, gloo otherwise)
cannot be a pull-style ``fetch``, since every rank must take part at once; it
keeps ``FlatParams``, ``Payload`` and this version protocol, and its payloads
carry no refs.

Dtypes: the learner keeps fp32 master weights; when the rollout workers hold
bf16 weights (on CUDA), ``WeightPublisher(wire_dtype=bfloat16)`` publishes a
bf16 cast of the master buffer, and "payload ``v``" means that cast.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np
import torch

from actors.weights.flat import WIRE_VIEW, FlatParams
from actors.weights.payload import Payload


Put = Callable[[np.ndarray], Any]
"""Stores one wire array and returns its handle (``actors.runtime.object_store.put``: ``ray.put``)."""
Fetch = Callable[[dict[str, Any]], dict[str, Any]]
"""Turns ``{dtype name: handle}`` back into ``{dtype name: array}`` (``actors.runtime.object_store.fetch``)."""


def to_wire(buffers: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The flat buffers as numpy arrays (bf16 as its int16 bit pattern: numpy has no bf16)."""
    out = {}
    for name, flat in buffers.items():
        wire = flat.detach()
        if wire.dtype in WIRE_VIEW:
            wire = wire.view(WIRE_VIEW[wire.dtype])
        out[name] = wire.cpu().numpy()
    return out


def from_wire(arrays: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Tensors viewing fetched wire arrays (read-only object-store memory: only ever read)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {name: torch.from_numpy(np.asarray(arr)) for name, arr in arrays.items()}


class WeightPublisher:
    """Learner side: owns the version counter and publishes flat buffers."""

    def __init__(self, flat: FlatParams, wire_dtype: torch.dtype | None = None):
        self.flat = flat
        self.version = 0
        same = wire_dtype is None or all(b.dtype == wire_dtype for b in flat.buffers.values())
        self.wire_dtype = None if same else wire_dtype
        self.wire_fingerprint = flat.fingerprint if same else flat.fingerprint_as(wire_dtype)
        self._cast: torch.Tensor | None = None

    def bump(self) -> int:
        """Call once after every optimizer step."""
        self.version += 1
        return self.version

    def wire(self) -> dict[str, torch.Tensor]:
        """The buffers receivers hold: the master buffers themselves, or their cast to
        ``wire_dtype`` (refreshed here, in a buffer kept across calls)."""
        if self.wire_dtype is None:
            return self.flat.buffers
        (src,) = self.flat.buffers.values()
        if self._cast is None:
            self._cast = torch.empty(src.numel(), dtype=self.wire_dtype, device=src.device)
        with torch.no_grad():
            self._cast.copy_(src)
        return {str(self.wire_dtype): self._cast}

    def publish(self, put: Put) -> Payload:
        """The current version as a payload whose buffers ``put`` stored (one call per dtype)."""
        return Payload(self.version, self.wire_fingerprint, {k: put(a) for k, a in to_wire(self.wire()).items()})


class WeightReceiver:
    """Rollout side: applies payloads into its own flat buffers."""

    def __init__(self, flat: FlatParams, version: int = 0):
        self.flat = flat
        self.version = version

    def apply(self, payload: Payload, fetch: Fetch, *, force: bool = False) -> bool:
        """Apply ``payload`` (its buffers fetched with ``fetch``) if newer than what we hold
        (or ``force``); True if applied."""
        if payload.version <= self.version and not (force and payload.version == self.version):
            return False
        if payload.fingerprint != self.flat.fingerprint:
            raise ValueError(
                f"weight payload layout {payload.fingerprint} does not match this policy's "
                f"{self.flat.fingerprint}: learner and rollout workers loaded different architectures "
                f"(or, with model.lora, different base weights or adapter settings)")
        incoming = from_wire(fetch(payload.refs))
        if incoming.keys() != self.flat.buffers.keys() or any(
                incoming[k].numel() != self.flat.buffers[k].numel() for k in incoming):
            raise ValueError("weight payload sizes do not match this policy's parameters")
        with torch.no_grad():
            for name, src in incoming.items():
                dst = self.flat.buffers[name]
                if dst.dtype in WIRE_VIEW:
                    dst = dst.view(WIRE_VIEW[dst.dtype])
                dst.copy_(src.to(dst.device), non_blocking=False)
        del incoming  # release the object-store views promptly
        self.version = payload.version
        return True
