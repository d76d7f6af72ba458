"""LoRA: the learner trains adapters (PEFT), and only the adapters travel as weights.

* ``LoraSpec`` is the ``model.lora`` config section (rank 0 = full fine-tuning).
* ``wrap_for_training`` makes the learner's policy a PEFT model; ``adapter_params`` are
  its trainable tensors, the only ones the learner's ``FlatParams`` holds and publishes.
* ``AdapterMerger`` is the rollout side: a flat buffer of the same adapter tensors (the
  weight receivers of both transports copy payloads into it) and the merge into the
  worker's own policy, ``W = W_base + scaling * B @ A`` from a kept copy of ``W_base``:
  exact whatever versions came before (no unmerge that drifts), and the engines keep
  generating from a plain model (HF) or reload merged weights (vLLM).
* ``base_fingerprint``: a digest of the base weights, folded into the payload's layout
  fingerprint so a worker that loaded another base refuses the adapters.

The adapter layout on the rollout side comes from PEFT itself, applied to a copy of the
model built on the ``meta`` device (no memory): names and shapes match the learner's by
construction, not by re-implementing PEFT's target-module matching.

Imports torch, transformers and peft; nothing of fleetrl but ``actors.validation`` and
``actors.weights.flat``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Union

import torch

from actors.validation import require
from actors.weights.flat import FlatParams

ADAPTER = "default"  # PEFT's name of the one adapter


@dataclass(kw_only=True)
class LoraSpec:
    rank: int = 0
    """LoRA rank r of every adapted linear layer; 0 = full fine-tuning (no adapters)."""
    alpha: float = 16.0
    """LoRA alpha: the update is scaled by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapters' input in the learner's gradient passes (off in rollouts and in the
    log-prob recomputes; > 0 makes the policy-gradient ratio noisy, so 0 by default)."""
    target_modules: Union[str, list[str]] = "all-linear"
    """Layers that get adapters: PEFT's ``target_modules`` (``all-linear`` = every linear layer but
    the output head, or a list of module-name suffixes such as ``[q_proj, v_proj]``)."""
    save_merged: bool = False
    """Also save the final policy with the adapters merged (``<run>/policy-merged``), a plain model
    folder; ``<run>/policy`` is always the adapter (PEFT format, loadable as ``model.path``)."""

    def __post_init__(self):
        require(self.rank >= 0, "model.lora.rank", "must be >= 0 (0 = full fine-tuning)")
        require(self.alpha > 0, "model.lora.alpha", "must be > 0")
        require(0 <= self.dropout < 1, "model.lora.dropout", "must be in [0, 1)")
        require(bool(self.target_modules) and (isinstance(self.target_modules, str) or all(
            isinstance(t, str) and t for t in self.target_modules)), "model.lora.target_modules",
            "must be all-linear or a list of module names")

    @property
    def enabled(self) -> bool:
        return self.rank > 0


def peft_config(spec: LoraSpec):
    from peft import LoraConfig

    targets = spec.target_modules if isinstance(spec.target_modules, str) else list(spec.target_modules)
    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM")


def wrap_for_training(model, spec: LoraSpec):
    """The PEFT model of ``model`` (its base weights frozen, the adapters trainable); a
    ValueError naming ``model.lora.target_modules`` when they match no layer."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, peft_config(spec))
    except ValueError as e:
        raise ValueError(f"model.lora.target_modules: {str(e).splitlines()[0][:300]}") from None


def adapter_params(peft_model) -> list[tuple[str, torch.nn.Parameter]]:
    """The adapter tensors (PEFT's names), in module order: what is trained and published."""
    return [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]


def base_fingerprint(model) -> str:
    """A digest of a policy's base weights: every parameter's name, shape and 64 evenly spaced
    values rounded to bfloat16 (so an fp32 learner and a bf16 worker of the same base agree, and
    a fine-tuned variant of the same architecture does not). Call before ``wrap_for_training``."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            flat = p.detach().reshape(-1)
            picks = flat[:: max(1, flat.numel() // 64)][:64].to("cpu", torch.bfloat16)
            h.update(f"{name}{tuple(p.shape)}".encode())
            h.update(picks.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class _Target:
    weight: torch.nn.Parameter  # the adapted layer's weight in the worker's policy
    base: torch.Tensor  # its base value, kept
    a: torch.Tensor  # [r, in]: a view into the adapter flat buffer
    b: torch.Tensor  # [out, r]
    scaling: float
    fan_in_fan_out: bool = field(default=False)


class AdapterMerger:
    """Rollout side: the adapter tensors of one policy as a ``FlatParams`` (zero until the first
    payload: version 0 is the base), and their merge into the policy's own weights."""

    def __init__(self, model, spec: LoraSpec):
        from peft.tuners.lora import LoraLayer
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            shadow = wrap_for_training(AutoModelForCausalLM.from_config(model.config), spec)
        dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
        tensors = {n: torch.nn.Parameter(torch.zeros(p.shape, dtype=dtype, device=device), requires_grad=False)
                   for n, p in adapter_params(shadow)}
        self.flat = FlatParams(list(tensors.items()), salt=base_fingerprint(model))
        self.targets: list[_Target] = []
        for name, layer in shadow.named_modules():
            if not isinstance(layer, LoraLayer):
                continue
            weight = model.get_submodule(name.removeprefix("base_model.model.")).weight
            self.targets.append(_Target(weight=weight, base=weight.detach().clone(),
                                        a=tensors[f"{name}.lora_A.{ADAPTER}.weight"],
                                        b=tensors[f"{name}.lora_B.{ADAPTER}.weight"],
                                        scaling=float(layer.scaling[ADAPTER]), fan_in_fan_out=layer.fan_in_fan_out))
        require(bool(self.targets), "model.lora.target_modules", "matched no layer of the policy")

    @torch.no_grad()
    def merge(self) -> None:
        """Every adapted weight := its base + scaling * B @ A (computed in float32)."""
        for t in self.targets:
            delta = t.scaling * (t.b.float() @ t.a.float())
            t.weight.copy_(t.base.float() + (delta.T if t.fan_in_fan_out else delta))

    def extra_bytes(self) -> int:
        """Memory this adds to a worker: the kept base copies and the adapters."""
        return sum(t.base.numel() * t.base.element_size() for t in self.targets) + sum(
            b.numel() * b.element_size() for b in self.flat.buffers.values())
