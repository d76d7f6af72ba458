"""The checkpoint format, all of it: what a checkpoint folder holds and how it is written and found.

A checkpoint is a folder ``<run>/checkpoints/step-NNNNNN`` holding

* ``policy/``            the policy (``save_pretrained``: safetensors, config, tokenizer);
* ``learner_state.pt``   optimizer, scheduler, RNG states, ``policy_version``, estimator state;
* ``trainer_state.json`` the step and the prompt stream's resume point (cursor, trained uids after it);
* ``COMPLETE``           written last: only a folder with it is a checkpoint.

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

from actors.validation import ConfigError

MARKER = "COMPLETE"
LEARNER_STATE = "learner_state.pt"
TRAINER_STATE = "trainer_state.json"


class CheckpointError(ConfigError):
    """No usable checkpoint where ``train.resume`` points, or one that does not fit the policy."""


def save_learner_state(learner, path: str) -> None:
    """The learner's part: its policy folder and ``learner_state.pt``."""
    learner.save_policy(os.path.join(path, "policy"))
    torch.save({"optimizer": learner.optimizer.state_dict(), "scheduler": learner.scheduler.state_dict(),
                "policy_version": learner.publisher.version, "baseline": learner.estimator.baseline,
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}},
               os.path.join(path, LEARNER_STATE))


def load_learner_state(learner, path: str) -> int:
    """Load what ``save_learner_state`` wrote (our own file: ``weights_only=False`` is safe
    here); returns the restored ``policy_version``. CheckpointError if the weights do not
    match the policy."""
    from safetensors.torch import load_file

    weights = {}
    for f in sorted(os.listdir(os.path.join(path, "policy"))):
        if f.endswith(".safetensors"):
            weights.update(load_file(os.path.join(path, "policy", f)))
    try:
        missing, unexpected = learner.model.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # a tensor of another shape: another architecture
        first = str(e).strip().splitlines()[1:2] or [str(e)]  # the first "size mismatch for ..." line
        raise CheckpointError(f"checkpoint {path} does not match the policy: {first[0].strip()[:300]}") from None
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
        raise CheckpointError(f"checkpoint {path} does not match the policy: missing {missing}, "
                              f"unexpected {unexpected}")
    state = torch.load(os.path.join(path, LEARNER_STATE), weights_only=False)
    learner.optimizer.load_state_dict(state["optimizer"])
    learner.scheduler.load_state_dict(state["scheduler"])
    learner.estimator.baseline = state["baseline"]
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    learner.publisher.version = state["policy_version"]
    return learner.publisher.version


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
