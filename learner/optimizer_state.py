"""AdamW's state in a checkpoint: sharded with ``torch.distributed.checkpoint``, read by any rank count.

Pure torch. Every learner rank writes its own shard of the moments (``exp_avg``,
``exp_avg_sq``) and ``step``, keyed by parameter name, as one safetensors file
(``HuggingFaceStorageWriter(save_distributed=True)``: each tensor's offset in the whole
tensor is in the file's JSON header). Loading (``HuggingFaceStorageReader``) rebuilds DCP's
metadata from those headers and each rank reads the slices of its own shard, whatever the
rank count that wrote them (resharding: 2 ranks to 1, 1 to 2, ...). Nothing is gathered on
one rank, and nothing is unpickled: DCP's default ``FileSystemWriter`` keeps its metadata in a
pickle (``.metadata``), and a checkpoint must never run code when it is loaded.

The param groups (learning rates, betas, parameter names) are plain data and travel in
``learner_state.pt``. An AdamW that has taken no step has no state: nothing is written, and
loading leaves a fresh AdamW with the saved learning rates.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings

import torch
import torch.distributed as dist

FOLDER = "optimizer"


def save_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: str) -> dict:
    """Write this rank's shard of ``optimizer``'s state under ``path/optimizer`` (a collective
    with ranks: every rank calls it); returns what ``load_optimizer`` needs besides the files:
    ``{"param_groups": [...], "files": "optimizer"}`` (no ``files`` when there is no state)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    groups = _param_groups(model, optimizer)
    if not optimizer.state:  # torch's helpers would take a zero-lr step to create the state: it counts as one
        return {"param_groups": groups, "state": {}}
    state = get_optimizer_state_dict(model, optimizer)["state"]  # this rank's shards, no copies
    folder = os.path.join(path, FOLDER)
    if not _distributed() or dist.get_rank() == 0:  # the reader merges every file there: no stale shards
        shutil.rmtree(folder, ignore_errors=True)
    if _distributed():
        dist.barrier()
    try:
        with _one_process_is_intended():
            dcp.save({"state": state}, storage_writer=dcp.HuggingFaceStorageWriter(folder, save_distributed=True),
                     no_dist=not _distributed())
    except dcp.CheckpointException as e:  # a BaseException: as an Exception, with the failing rank's cause
        raise RuntimeError(f"writing the optimizer state failed: {_first_cause(e)}") from None
    return {"param_groups": groups, "files": FOLDER}


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: str, saved: dict) -> None:
    """What ``save_optimizer`` wrote into ``path`` (any rank count) into ``optimizer``, each rank
    its own shard. ValueError (one line) when the files do not hold this policy's state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    if "files" not in saved:
        for group, old in zip(optimizer.param_groups, saved.get("param_groups", [])):
            group["lr"] = old["lr"]
        return
    reader = dcp.HuggingFaceStorageReader(os.path.join(path, FOLDER))  # never a path the file names
    try:
        with _one_process_is_intended():
            if not _zero_state(model, optimizer, set(reader.read_metadata().state_dict_metadata)):
                raise ValueError("it holds state for none of this policy's parameters")
            target = {"state": get_optimizer_state_dict(model, optimizer)["state"]}
            dcp.load(target, storage_reader=reader, no_dist=not _distributed())
            set_optimizer_state_dict(model, optimizer, {"state": target["state"], "param_groups": saved["param_groups"]})
    except (Exception, dcp.CheckpointException) as e:  # noqa: BLE001 - DCP's own is a BaseException
        optimizer.state.clear()
        raise ValueError(f"its optimizer state cannot be loaded into this policy: {_first_cause(e)}") from None


def _param_groups(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[dict]:
    """The optimizer's param groups with parameter names instead of tensors (plain data)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
            for g in optimizer.param_groups]


def _zero_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved_keys: set[str]) -> int:
    """AdamW's state, zero, for every parameter the checkpoint holds state for (DCP loads into
    existing tensors; a parameter that never had a gradient has none, in the file or here);
    returns how many parameters got one."""
    names = {id(p): n for n, p in model.named_parameters()}
    made = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p not in optimizer.state and f"state.{names[id(p)]}.exp_avg" in saved_keys:
                optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}
                made += 1
    return made


def _first_cause(e: BaseException) -> str:
    """One line: for DCP's CheckpointException the error of the first failing rank."""
    failures = getattr(e, "failures", None)
    cause = next(iter(failures.values()))[0] if failures else e
    return ((str(cause).strip().splitlines() or [type(cause).__name__])[0])[:300]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _one_process_is_intended():
    """DCP warns on every call without a process group (one learner rank): that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield
