"""Where a component runs and in which dtype: one rule for the learner and the rollout workers.

* ``device`` (``learner.device``, ``rollout.device``): ``cuda``, ``cpu`` or ``auto``.
  ``auto`` is CUDA exactly when the component reserves GPUs (``num_gpus > 0``):
  Ray hides every GPU from an actor that reserves none (``CUDA_VISIBLE_DEVICES=""``),
  so "CUDA if available" and "CUDA if reserved" are the same thing inside an actor,
  and the driver can resolve it without looking at the cluster. ``cuda`` with
  ``num_gpus = 0`` is a configuration error; ``cuda`` in a process whose torch sees
  no GPU is a runtime error naming the torch build (no silent fallback to CPU).
* ``dtype``: ``float32``, ``bfloat16`` or ``auto`` (bf16 on CUDA; on CPU bf16 when the CPU
  has bf16 matrix instructions and the policy is big enough for it to pay, else fp32:
  ``auto_dtype``). Rollout workers hold their weights in it (a run resolves ``auto`` once, on
  the driver's node, so every worker holds what the learner publishes). The learner always keeps **fp32
  master weights and fp32 AdamW state** and uses ``dtype`` as the compute dtype
  (``torch.autocast``; logits are computed at the completion positions only and stay in
  it until the log-softmax upcasts them to fp32), the way
  verl and OpenRLHF train; it casts its weights to the rollout dtype when it
  publishes them.
"""

from __future__ import annotations

import functools
import os

import torch

from actors.validation import require

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16")


def device_kind(device: str, num_gpus: float) -> str:
    """``"cuda"`` or ``"cpu"``: what ``device`` resolves to for a component reserving ``num_gpus``."""
    return "cuda" if device == "cuda" or (device == "auto" and num_gpus > 0) else "cpu"


BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
BF16_CPU_MIN_PARAMS = 50_000_000


@functools.cache
def cpu_bf16_flags() -> tuple[str, ...]:
    """This CPU's bf16 matrix instructions (AMX-BF16, AVX512-BF16) from ``/proc/cpuinfo``; empty
    where there are none (AVX2-only x86: torch emulates bf16 there, slower than fp32) or no
    ``/proc/cpuinfo`` (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return ()
    return tuple(x for x in BF16_CPU_FLAGS if x in flags)


def auto_dtype(dtype: str, kind: str, num_params: int | None) -> str:
    """What ``dtype`` means for a component on a ``kind`` device holding a policy of
    ``num_params`` parameters (None or 0: unknown). ``auto``: bf16 on CUDA; on CPU bf16 when the
    CPU has bf16 matrix instructions and the policy has at least ``BF16_CPU_MIN_PARAMS``
    parameters (SmolLM2-135M's update: 1.43x faster on AVX512-BF16, see the README), else fp32:
    a smaller policy's runs are not limited by its matmuls, and fp32 keeps its log-probs exact."""
    if dtype != "auto":
        return dtype
    if kind == "cuda":
        return "bfloat16"
    return "bfloat16" if cpu_bf16_flags() and (num_params or 0) >= BF16_CPU_MIN_PARAMS else "float32"


def torch_dtype(dtype: str, device: torch.device, num_params: int | None) -> torch.dtype:
    """``auto_dtype`` on this process's node, as a torch dtype."""
    return getattr(torch, auto_dtype(dtype, device.type, num_params))


def check_device(section: str, device: str, dtype: str, num_gpus: float) -> None:
    """Config-time checks of one component's device fields (ConfigError naming the key)."""
    require(device in DEVICES, f"{section}.device", f"{device!r} is not one of {', '.join(map(repr, DEVICES))}")
    require(dtype in DTYPES, f"{section}.dtype", f"{dtype!r} is not one of {', '.join(map(repr, DTYPES))}")
    require(device != "cuda" or num_gpus > 0, f"{section}.device",
            f"cuda needs {section}.num_gpus > 0 (Ray hides GPUs from actors that reserve none; "
            f"e.g. --{section}.num_gpus 1, or 0.5 to share a GPU)")


def torch_device(device: str, num_gpus: float, key: str) -> torch.device:
    """The torch device of a component, checked in the process that will use it."""
    kind = device_kind(device, num_gpus)
    if kind == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"{key}: runs on CUDA (device={device!r}, num_gpus={num_gpus}) but torch {torch.__version__} "
            f"(CUDA build: {torch.version.cuda or 'none, a CPU-only wheel'}) sees no GPU in this process "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); install a CUDA build of torch "
            f"or set {key.split('.')[0]}.device: cpu")
    return torch.device(kind)


def mixed_precision(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Run ``model``'s forward under ``torch.autocast(dtype)``. Logits come back in the
    compute dtype: callers ask for the positions they use (``logits_to_keep``) and upcast
    those (``token_logprobs``).

    The parameters (and so the optimizer state) stay in their own dtype (fp32
    master weights); matmuls run in ``dtype``. A no-op when ``dtype`` is the
    parameters' dtype. Applies to ``generate`` too (it calls ``forward``).
    """
    param_dtype = next(model.parameters()).dtype
    if dtype == param_dtype:
        return model
    device_type = next(model.parameters()).device.type
    inner = model.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            return inner(*args, **kwargs)

    model.forward = forward
    return model
