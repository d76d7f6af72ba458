"""Learner ranks: one policy sharded with FSDP2 over ``learner.num_workers`` processes.

Pure torch (``torch.distributed``; gloo on CPU, NCCL when every rank has a GPU of its own).
``learner.actor`` starts the ranks as Ray actors and hands rank 0 the others; the driver
only ever talks to rank 0, which runs each collective call on every rank at once
(``Learner.on_all_ranks``).

How N ranks compute the update one rank would (the test in ``tests/test_ranks.py``):

* every rank holds the whole batch and computes the advantages and every normaliser
  (token counts, sequence counts, batch statistics) over the global batch;
* ``split_rows`` gives each rank a share of the rows balanced by tokens; each rank
  backpropagates its rows' terms of the *global* loss, and FSDP's reduce-scatter sums the
  ranks' gradients (``GRAD_SUM``: its default averages);
* every rank runs the same number of forward/backward passes (FSDP's collectives pair
  them up across ranks): a rank with fewer rows runs placeholder passes whose loss is
  multiplied by zero;
* metrics are partial sums weighted by the global row count, added across ranks.
"""

from __future__ import annotations

import math
import socket
from datetime import timedelta

import torch
import torch.distributed as dist


def free_address(host: str) -> str:
    """``tcp://HOST:PORT`` with a port free on this node (rank 0 serves the rendezvous there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"


def init_ranks(address: str, rank: int, world_size: int, device: torch.device, timeout_s: float) -> None:
    """Join the learner ranks' default process group (gloo on CPU, NCCL on CUDA); every
    collective afterwards fails after ``timeout_s`` instead of waiting for a dead rank."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=address, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))


def shard(model: torch.nn.Module, *, offload: bool = False) -> None:
    """FSDP2: each decoder layer (the classes in ``model._no_split_modules``) is its own unit,
    then the rest (embeddings, final norm, head). ``offload``: parameters, gradients and
    optimizer state live in host memory between uses (CUDA only)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, fully_shard

    if not hasattr(FSDPModule, "set_force_sum_reduction_for_comms"):
        raise RuntimeError(f"learner.num_workers > 1 needs torch >= 2.8 (FSDP2 sum reductions); this is {torch.__version__}")

    layer_types = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in layer_types]
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layers to shard (_no_split_modules is {layer_types})")
    kwargs = {"offload_policy": CPUOffloadPolicy()} if offload else {}
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    for unit in [*layers, model]:  # each rank backpropagates its terms of the global loss: sum them
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)


def split_rows(rows: list[int], tokens: list[int], world_size: int) -> list[list[int]]:
    """``rows`` split in ``world_size`` shares balanced by ``tokens[i]`` (longest first, each to
    the share with the fewest tokens so far; ties to the lower rank); each share keeps the
    rows' order. The same on every rank."""
    shares: list[list[int]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for i in sorted(rows, key=lambda r: (-tokens[r], r)):
        k = min(range(world_size), key=lambda j: (load[j], j))
        shares[k].append(i)
        load[k] += tokens[i]
    order = {r: n for n, r in enumerate(rows)}
    return [sorted(s, key=order.__getitem__) for s in shares]


def passes(shares: list[list[int]], micro_batch: int) -> int:
    """Forward/backward passes every rank runs: the most any share needs."""
    return max(math.ceil(len(s) / micro_batch) for s in shares) if shares else 0


def gather(obj):
    """Every rank's ``obj``, in rank order (``all_gather_object``)."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def merge_metrics(parts: list[dict]) -> dict:
    """Partial metrics of the ranks (sums weighted by global counts) added up; ``ratio_max``
    is the largest. A key no rank reported stays out."""
    out: dict = {}
    for part in parts:
        for k, v in part.items():
            if v is None:
                continue
            out[k] = max(out.get(k, v), v) if k == "ratio_max" else out.get(k, 0.0) + v
    return out


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole policy's state dict, gathered on rank 0 in host memory (empty on the others).
    A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def to_full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective), or ``t`` itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def copy_into_flat(state: dict[str, torch.Tensor], flat) -> None:
    """Rank 0: the gathered ``state`` into the publisher's ``FlatParams`` (by its spec's names,
    offsets and dtypes); the other ranks pass ``flat=None``."""
    if flat is None:
        return
    with torch.no_grad():
        for name, shape, dtype, offset in flat.spec:
            src = state[name]
            flat.buffers[dtype][offset:offset + src.numel()].copy_(src.reshape(-1))


def save_whole(config, state: dict[str, torch.Tensor], path: str) -> None:
    """Rank 0: the gathered ``state`` as a Hugging Face folder, through a plain model of the
    same ``config`` built on the meta device and given these tensors (``save_pretrained`` on the
    sharded model would gather on this rank alone and wait for the others forever)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(state, strict=False, assign=True)
    plain.tie_weights()
    plain.save_pretrained(path)
