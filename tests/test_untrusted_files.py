"""Files fleetrl did not write itself load without running code from them.

A crafted ``learner_state.pt`` (``--resume``) is refused by ``torch.load(weights_only=True)``;
a policy whose weights are pickle files is refused unless ``model.allow_pickle``, and
then converted once to safetensors so every component loads safetensors only. Real
files, real models (``tiny_policy``), real ``torch.load`` / ``from_pretrained``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from actors.rollout.policy import check_policy_files, load_policy
from actors.validation import ConfigError
from learner.checkpoint import LEARNER_STATE, CheckpointError, write_checkpoint
from learner.config import load_config
from learner.driver.policy import CONVERTED, resolve_policy
from learner.learner import Learner, LearnerConfig

ROOT = Path(__file__).resolve().parent.parent


class _MakesDir:
    """Unpickling this calls ``os.makedirs(path)``: a stand-in for any code a crafted pickle runs."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.makedirs, (self.path,)


def _crafted_state(file: Path, marker: Path) -> None:
    torch.save({"optimizer": _MakesDir(marker), "scheduler": {}, "policy_version": 7, "baseline": 0.0,
                "rng": {"torch": torch.get_rng_state(), "python": (3, (1, 2), None)}}, file)


def test_a_crafted_learner_state_is_refused_and_runs_nothing(tiny_policy, tmp_path):
    learner = Learner(tiny_policy, LearnerConfig(num_threads=1), total_steps=1)
    saved = write_checkpoint(tmp_path / "run", 2, learner.save_state, {"cursor": 8, "skip": []})
    marker = tmp_path / "payload-ran"
    _crafted_state(saved / LEARNER_STATE, marker)
    # the file is a real payload: the unsafe loader runs it (in a child process, on another marker)
    probe, probe_marker = tmp_path / "probe.pt", tmp_path / "probe-ran"
    _crafted_state(probe, probe_marker)
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(probe)!r}, weights_only=False)"],
                   cwd=ROOT, check=True, capture_output=True, timeout=120)
    assert probe_marker.is_dir(), "the crafted pickle did not run its payload under weights_only=False"

    before = learner.param_vector().clone()
    with pytest.raises(CheckpointError) as e:
        learner.load_state(str(saved))
    assert not marker.exists(), "loading the checkpoint ran code from learner_state.pt"
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"checkpoint {saved}: refused {LEARNER_STATE}"), msg
    assert torch.equal(learner.param_vector(), before), "the refused checkpoint changed the weights"
    assert learner.publisher.version == 0


def test_a_genuine_learner_state_is_plain_tensor_data(tiny_policy, tmp_path):
    """What fleetrl writes loads under weights_only=True, RNG states included."""
    import random

    learner = Learner(tiny_policy, LearnerConfig(num_threads=1), total_steps=1)
    random.seed(1234)
    saved = write_checkpoint(tmp_path / "run", 2, learner.save_state, {"cursor": 8, "skip": []})
    expected = random.random()
    state = torch.load(saved / LEARNER_STATE, weights_only=True)
    assert set(state) == {"optimizer", "scheduler", "policy_version", "baseline", "rng"}
    random.seed(0)
    assert Learner(tiny_policy, LearnerConfig(num_threads=1), total_steps=1).load_state(str(saved)) == 0
    assert random.random() == expected  # the Python RNG state was restored


def test_every_torch_load_in_the_repo_is_weights_only():
    hits = []
    top = [d for d in ROOT.iterdir() if d.is_dir() and not d.name.startswith(".") and "egg-info" not in d.name]
    files = [f for d in top for f in d.rglob("*.py") if f != Path(__file__).resolve()]  # this file: the probe
    assert any(f.name == "checkpoint.py" for f in files)
    for path in sorted(files):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line:
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "torch.load without weights_only=True:\n" + "\n".join(hits)


# ---- policies: safetensors only unless model.allow_pickle ---------------------------------------

@pytest.fixture(scope="module")
def pickle_policy(tiny_policy, tmp_path_factory) -> Path:
    """``tiny_policy`` with its weights as ``pytorch_model.bin`` only (config, tokenizer kept)."""
    from safetensors.torch import load_file

    out = tmp_path_factory.mktemp("pickle-policy") / "policy"
    shutil.copytree(tiny_policy, out, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(str(Path(tiny_policy) / "model.safetensors")), out / "pytorch_model.bin")
    return out


def _folder(tmp_path: Path, files: dict[str, str]) -> Path:
    d = tmp_path / "policy"
    d.mkdir()
    for name, text in files.items():
        (d / name).write_text(text)
    return d


INDEX = json.dumps({"weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                                   "b.weight": "model-00002-of-00002.safetensors"}})
REFUSED = {
    "missing": ({}, "does not exist"),
    "pickle-bin": ({"config.json": "{}", "pytorch_model.bin": "x"}, "weights only as pickle files (pytorch_model.bin)"),
    "pickle-pt": ({"config.json": "{}", "weights.pt": "x", "extra.pkl": "x"}, "weights only as pickle files"),
    "no-weights": ({"config.json": "{}"}, "has no model weights"),
    "missing-shard": ({"config.json": "{}", "model.safetensors.index.json": INDEX,
                       "model-00001-of-00002.safetensors": "x"}, "missing or non-safetensors shards"),
    "explicit-pickle": ({"config.json": json.dumps({"transformers_weights": "adapter_model.bin"}),
                         "model.safetensors": "x", "adapter_model.bin": "x"}, "not safetensors"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_check_policy_files_refuses(tmp_path, case):
    files, reason = REFUSED[case]
    path = tmp_path / "nope" if case == "missing" else _folder(tmp_path, files)
    with pytest.raises(ConfigError) as e:
        check_policy_files(str(path), allow_pickle=False)
    msg = str(e.value)
    assert msg.startswith("model.path: ") and reason in msg and "\n" not in msg, msg
    if case.startswith(("pickle", "explicit")):
        assert "model.allow_pickle: true" in msg
        check_policy_files(str(path), allow_pickle=True)  # allowed: accepted


@pytest.mark.parametrize("files", [{"model.safetensors": "x", "pytorch_model.bin": "x"},
                                   {"model.safetensors.index.json": INDEX, "model-00001-of-00002.safetensors": "x",
                                    "model-00002-of-00002.safetensors": "x"}], ids=["both", "sharded"])
def test_check_policy_files_accepts_safetensors(tmp_path, tiny_policy, files):
    check_policy_files(str(_folder(tmp_path, {"config.json": "{}", **files})), allow_pickle=False)
    check_policy_files(tiny_policy, allow_pickle=False)
    check_policy_files("", allow_pickle=False)  # the built-in policy


def test_load_policy_loads_safetensors_only(pickle_policy, tiny_policy):
    with pytest.raises(OSError, match="model.safetensors"):
        load_policy(str(pickle_policy), device=torch.device("cpu"), dtype="float32")
    model, _ = load_policy(tiny_policy, device=torch.device("cpu"), dtype="float32")
    assert sum(p.numel() for p in model.parameters()) > 0


def test_resolve_policy_refuses_a_pickle_policy(pickle_policy, tmp_path):
    cfg = load_config(None, ["--model.path", str(pickle_policy)])
    with pytest.raises(ConfigError, match=re.escape("model.allow_pickle: true")):
        resolve_policy(cfg, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_allow_pickle_converts_once_to_safetensors(pickle_policy, tiny_policy, tmp_path):
    cfg = load_config(None, ["--model.path", str(pickle_policy), "--model.allow_pickle", "true"])
    path, info = resolve_policy(cfg, run_dir=tmp_path / "run")
    assert Path(path) == (tmp_path / "run" / CONVERTED).resolve() and info == {}
    assert (Path(path) / "model.safetensors").is_file() and not list(Path(path).glob("*.bin"))
    converted, tok = load_policy(path, device=torch.device("cpu"), dtype="float32")  # safetensors only
    original, tok0 = load_policy(tiny_policy, device=torch.device("cpu"), dtype="float32")
    for (name, a), (_, b) in zip(converted.state_dict().items(), original.state_dict().items()):
        assert torch.equal(a, b), name
    assert tok("12") == tok0("12")
    stamp = (Path(path) / "model.safetensors").stat().st_mtime_ns
    assert resolve_policy(cfg, run_dir=tmp_path / "run")[0] == path  # a resume: the same copy, not converted again
    assert (Path(path) / "model.safetensors").stat().st_mtime_ns == stamp
