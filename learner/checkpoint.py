"""The checkpoint format, all of it: what a checkpoint folder holds and how it is written and found.

A checkpoint is a folder ``<run>/checkpoints/step-NNNNNN`` holding

* ``policy/``            the policy (``save_pretrained``: safetensors, config, tokenizer; with
  ``model.lora``, the adapter in PEFT's format: ``adapter_model.safetensors``, ``adapter_config.json``);
* ``optimizer/``         AdamW's state, one safetensors shard per learner rank written with
  ``torch.distributed.checkpoint`` (``learner.optimizer_state``): any number of ranks loads it;
* ``learner_state.pt``   the optimizer's param groups, scheduler, RNG states, ``policy_version``,
  estimator state: tensors and plain containers only, loaded with
  ``torch.load(weights_only=True)`` so a crafted file cannot run code (it is refused with a
  CheckpointError);
* ``trainer_state.json`` the step and the prompt stream's resume point (cursor, trained uids after it);
* ``COMPLETE``           written last: only a folder with it is a checkpoint.

With learner ranks (FSDP2) the policy is gathered (it is, once per version, for publishing
anyway) and rank 0 writes it; each rank writes its own shard of the optimizer state.

It is written into ``step-NNNNNN.tmp`` and renamed, so a crash leaves either
the previous checkpoint or a ``.tmp`` folder that ``find_checkpoint`` skips.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Callable

import torch

from actors.rollout.policy import ADAPTER_WEIGHTS
from actors.validation import ConfigError
from learner.optimizer_state import load_optimizer, save_optimizer

MARKER = "COMPLETE"
LEARNER_STATE = "learner_state.pt"
TRAINER_STATE = "trainer_state.json"


class CheckpointError(ConfigError):
    """No usable checkpoint where ``train.resume`` points, or one that does not fit the policy."""


def save_learner_state(learner, path: str) -> None:
    """The learner's part: its policy folder and ``learner_state.pt``."""
    # with learner ranks the gather and DCP's save are collectives: every rank makes them, then
    # rank 0 alone writes the rest (a slow or failing write must not leave the others waiting)
    policy = ranks_full_state(learner)
    optimizer = save_optimizer(learner.model, learner.optimizer, path)
    if learner.rank != 0:
        return
    learner.write_policy(os.path.join(path, "policy"), policy)
    torch.save({"optimizer": optimizer, "scheduler": learner.scheduler.state_dict(),
                "policy_version": learner.publisher.version, "baseline": learner.estimator.baseline,
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}},
               os.path.join(path, LEARNER_STATE))


def ranks_full_state(learner) -> dict | None:
    """The whole policy gathered on rank 0 (None with one rank: it saves its own model)."""
    if learner.world_size == 1:
        return None
    from learner.ranks import full_state

    return full_state(learner.model)


_STATE_KEYS = ("optimizer", "scheduler", "policy_version", "baseline", "rng")


def read_learner_state(path: str) -> dict:
    """``learner_state.pt`` of the checkpoint at ``path``, unpickled with ``weights_only=True``
    (tensors, numbers, strings and plain containers; nothing in the file can run code).
    CheckpointError (one line) for a file that needs more, or is unreadable or incomplete."""
    file = os.path.join(path, LEARNER_STATE)
    try:
        state = torch.load(file, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path}: {LEARNER_STATE} is missing") from None
    except Exception as e:  # noqa: BLE001 - UnpicklingError for code, RuntimeError for a corrupt file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"checkpoint {path}: refused {LEARNER_STATE}: not plain tensor data "
                              f"(torch.load weights_only=True: {first[:200]})") from None
    missing = [k for k in _STATE_KEYS if not isinstance(state, dict) or k not in state]
    rng = state.get("rng") if isinstance(state, dict) else None
    if missing or not (isinstance(rng, dict) and isinstance(rng.get("torch"), torch.Tensor)
                       and isinstance(rng.get("python"), tuple)):
        raise CheckpointError(f"checkpoint {path}: {LEARNER_STATE} is incomplete "
                              f"(missing {missing or ['rng.torch/rng.python']})")
    return state


def load_learner_state(learner, path: str) -> int:
    """Load what ``save_learner_state`` wrote; returns the restored ``policy_version``.
    CheckpointError if ``learner_state.pt`` is not plain tensor data (checked before
    anything is changed) or the weights do not match the policy."""
    state = read_learner_state(path)
    adapter = os.path.join(path, "policy", ADAPTER_WEIGHTS)
    if (learner.lora is not None) != os.path.isfile(adapter):
        raise CheckpointError(f"checkpoint {path} holds {'LoRA adapters' if os.path.isfile(adapter) else 'full weights'}"
                              f" but model.lora.rank is {learner.lora.rank if learner.lora else 0}: resume with the "
                              f"model.lora settings it was trained with")
    if learner.lora is not None:
        _load_adapter(learner.model, adapter, path)
    else:
        _load_full(learner, path)
    _load_optimizer(learner, path, state["optimizer"])
    learner.scheduler.load_state_dict(state["scheduler"])
    learner.estimator.baseline = state["baseline"]
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    learner.publisher.version = state["policy_version"]
    return learner.publisher.version


def _load_optimizer(learner, path: str, saved: dict) -> None:
    """The sharded optimizer state (``learner.optimizer_state``) or, from a checkpoint of an older
    fleetrl, the whole state inside ``learner_state.pt`` (keyed by name, or by index: one rank)."""
    if "files" in saved or not saved.get("state"):
        try:
            return load_optimizer(learner.model, learner.optimizer, path, saved)
        except ValueError as e:
            raise CheckpointError(f"checkpoint {path}: {e}") from None
    if not all(isinstance(k, str) for k in saved["state"]):
        if learner.world_size > 1:
            raise CheckpointError(f"checkpoint {path}: its optimizer state is keyed by index (an older format): "
                                  f"resume it with learner.num_workers 1")
        return learner.optimizer.load_state_dict(saved)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(learner.model, learner.optimizer, optim_state_dict=saved,
                             options=StateDictOptions(full_state_dict=True))


def _first_mismatch(e: RuntimeError) -> str:
    """The first "size mismatch for ..." line of ``load_state_dict``'s error (else its first line)."""
    first = str(e).strip().splitlines()[1:2] or [str(e)]
    return first[0].strip()[:300]


def _load_full(learner, path: str) -> None:
    from safetensors.torch import load_file

    weights = {}
    for f in sorted(os.listdir(os.path.join(path, "policy"))):
        if f.endswith(".safetensors"):
            weights.update(load_file(os.path.join(path, "policy", f)))
    try:
        missing, unexpected = learner.load_policy_state(weights)
    except RuntimeError as e:  # a tensor of another shape: another architecture
        raise CheckpointError(f"checkpoint {path} does not match the policy: {_first_mismatch(e)}") from None
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
        raise CheckpointError(f"checkpoint {path} does not match the policy: missing {missing}, "
                              f"unexpected {unexpected}")


def _load_adapter(model, file: str, path: str) -> None:
    """PEFT's adapter file into the learner's PEFT model: every adapter tensor or an error (also
    when the checkpoint's rank or alpha differ from ``model.lora``: same shapes, another scale)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        saved = json.loads(open(os.path.join(os.path.dirname(file), "adapter_config.json")).read())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: its adapter_config.json is unreadable ({type(e).__name__})") from None
    spec = model.peft_config["default"]
    theirs, ours = (saved.get("r"), saved.get("lora_alpha")), (spec.r, spec.lora_alpha)
    if theirs != ours:
        raise CheckpointError(f"checkpoint {path}: its adapters have rank, alpha {theirs}, model.lora asks for {ours}")

    try:
        result = set_peft_model_state_dict(model, load_file(file))
    except RuntimeError as e:  # another rank or target layers: shapes differ
        raise CheckpointError(f"checkpoint {path}: its adapters do not match model.lora: {_first_mismatch(e)}") from None
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"checkpoint {path}: its adapters do not match model.lora: missing {missing[:3]}, "
                              f"unexpected {list(result.unexpected_keys)[:3]}")


def write_checkpoint(run_dir: Path, step: int, save_learner: Callable[[str], None], trainer_state: dict) -> Path:
    """Atomically: ``save_learner(tmp_dir)`` and the trainer state into ``step-N.tmp``,
    the marker last, then rename to ``step-N``."""
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step-{step:06d}", root / f"step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_learner(str(tmp.resolve()))
    (tmp / TRAINER_STATE).write_text(json.dumps({"step": step, **trainer_state}))
    (tmp / MARKER).write_text("complete\n")  # written last: the checkpoint is whole
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    return final


def find_checkpoint(where: str, run_dir: Path, say=print) -> tuple[Path, dict]:
    """The newest complete checkpoint under ``where`` ("auto" = ``run_dir``) and its trainer
    state: ``where`` may be a checkpoint folder itself, or a run directory / its
    ``checkpoints`` folder. Incomplete ones are skipped with a warning."""
    base = Path(run_dir) if where == "auto" else Path(where)
    if (base / MARKER).exists():
        candidates = [base]
    else:
        root = base / "checkpoints" if (base / "checkpoints").is_dir() else base
        candidates = sorted(root.glob("step-*"), reverse=True) if root.is_dir() else []
    for c in candidates:
        if (c / MARKER).exists():
            return c, json.loads((c / TRAINER_STATE).read_text())
        say(f"warning: skipping incomplete checkpoint {c} (no {MARKER} marker)")
    raise CheckpointError(f"train.resume: no complete checkpoint under {base}")


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints (the marker written), oldest first."""
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.glob("step-*") if not p.name.endswith(".tmp") and (p / MARKER).exists())


def prune_checkpoints(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` complete checkpoints of the run (0 = keep all), and
    ``.tmp`` leftovers older than the newest complete one; returns what was deleted."""
    root = Path(run_dir) / "checkpoints"
    if keep <= 0 or not root.is_dir():
        return []
    complete = complete_checkpoints(run_dir)
    doomed = complete[:-keep]
    newest = complete[-1].name if complete else None
    doomed += [p for p in root.glob("step-*.tmp") if newest and p.name[:-len(".tmp")] < newest]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed
