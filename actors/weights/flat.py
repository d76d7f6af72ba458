"""A policy's parameters as one flat buffer per dtype, and the payload that names a version.

``FlatParams`` rebinds every parameter as a view into one contiguous buffer
per dtype, so publishing or receiving the weights is one copy per dtype.
``Payload`` is what travels (through the coordinator) for one version;
``weights_digest`` hashes the buffers so tests can compare weights across
processes. Pure torch.
"""

from __future__ import annotations

import hashlib

import torch

# numpy has no bfloat16: such buffers travel as int16 bit patterns (exact).
WIRE_VIEW = {torch.bfloat16: torch.int16}


class FlatParams:
    """A model's parameters as views into one contiguous buffer per dtype.

    Tied parameters (e.g. ``lm_head`` sharing the embedding) appear once.
    Build it *before* creating an optimizer: parameters keep their identity,
    only their storage moves. ``model`` may also be a list of ``(name, parameter)``
    (a LoRA policy's adapters); ``salt`` is folded into the fingerprint (the adapters'
    base weights: ``actors.weights.lora.base_fingerprint``).
    """

    def __init__(self, model: torch.nn.Module | list[tuple[str, torch.nn.Parameter]], *, salt: str = ""):
        # named_parameters deduplicates tied weights
        params = dict(model.named_parameters() if isinstance(model, torch.nn.Module) else model)
        by_dtype: dict[torch.dtype, list[tuple[str, torch.nn.Parameter]]] = {}
        for name, p in params.items():
            by_dtype.setdefault(p.dtype, []).append((name, p))
        self.buffers: dict[str, torch.Tensor] = {}
        spec = []
        for dtype, items in sorted(by_dtype.items(), key=lambda kv: str(kv[0])):
            total = sum(p.numel() for _, p in items)
            flat = torch.empty(total, dtype=dtype, device=items[0][1].device)
            offset = 0
            for name, p in items:
                n = p.numel()
                view = flat[offset : offset + n].view_as(p)
                view.copy_(p.data)
                p.data = view
                spec.append((name, tuple(p.shape), str(dtype), offset))
                offset += n
            self.buffers[str(dtype)] = flat
        self.spec, self.salt = spec, salt
        self.fingerprint = _fingerprint(spec, salt)
        self.numel = sum(b.numel() for b in self.buffers.values())

    def fingerprint_as(self, dtype: torch.dtype) -> str:
        """The fingerprint ``FlatParams`` computes for this model cast to ``dtype``
        (all parameters in one buffer, the same order and offsets)."""
        if len(self.buffers) != 1:
            raise ValueError(f"casting weights for publishing needs one dtype, the policy has {list(self.buffers)}")
        return _fingerprint([(name, shape, str(dtype), offset) for name, shape, _, offset in self.spec], self.salt)


def _fingerprint(spec, salt: str = "") -> str:
    return hashlib.sha256((repr(spec) + salt).encode()).hexdigest()[:16]


def weights_digest(flat) -> str:
    """sha256 of a policy's flat parameter buffers (a ``FlatParams`` or its ``buffers``
    dict; compare weights across actors)."""
    h = hashlib.sha256()
    for name, buf in sorted(getattr(flat, "buffers", flat).items()):
        h.update(name.encode())
        h.update(buf.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
