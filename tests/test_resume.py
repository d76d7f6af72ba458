"""Checkpoints and exact resume."""

from __future__ import annotations

import io
import json
import os

import pytest
import ray
import torch

from actors.models.tiny import build_char_tokenizer, build_tiny_llama
from learner.checkpoint import CheckpointError, find_checkpoint, write_checkpoint
from learner.config import ConfigError
from learner.driver.trainer import Trainer
from learner.learner import Learner, LearnerConfig
from tests.test_algorithms import recorded_groups
from tests.test_pipeline import small_config


class CrashAt(Trainer):
    """Stops (as if it crashed) right after step ``crash_step``."""

    crash_step = 4

    def update(self, batch):
        m = super().update(batch)
        if self.submitted + 1 == self.crash_step:
            self.stop_requested.set()
        return m


def final_params(t: Trainer) -> torch.Tensor:
    return ray.get(t.learner.param_vector.remote())


def run(cfg, out, cls=Trainer):
    t = cls(cfg, out, out=io.StringIO(), progress=False)
    try:
        summary = t.train()
        return summary, final_params(t), t
    finally:
        t.shutdown()


def test_crash_and_resume_equals_an_uninterrupted_run(ray_session, tiny_policy, tmp_path):
    common = ["--train.steps", "8", "--train.max_staleness", "0", "--learner.lr", "1e-2"]
    full, p_full, _ = run(small_config(tiny_policy, *common), tmp_path / "a")
    first, _, _ = run(small_config(tiny_policy, *common, "--train.checkpoint_every", "2"), tmp_path / "b", CrashAt)
    assert first["steps"] == 4
    second, p_resumed, t = run(small_config(tiny_policy, *common, "--train.resume", "auto"), tmp_path / "b")
    assert "resumed from" in t.out.getvalue() and second["steps"] == 8
    assert torch.allclose(p_full, p_resumed, atol=1e-6, rtol=1e-5), float((p_full - p_resumed).abs().max())
    rows_a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b] == list(range(1, 9)), "monotone step counter across the resume"
    for ra, rb in zip(rows_a, rows_b):  # same data in the same order: same rewards and losses
        assert rb["reward_mean"] == pytest.approx(ra["reward_mean"], abs=1e-6)
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5)


def test_incomplete_checkpoint_is_skipped(tmp_path):
    root = tmp_path / "checkpoints"
    good = root / "step-000002"
    good.mkdir(parents=True)
    (good / "trainer_state.json").write_text(json.dumps({"step": 2, "cursor": 8, "skip": []}))
    (good / "COMPLETE").write_text("complete\n")
    half = root / "step-000004"
    half.mkdir()
    (half / "trainer_state.json").write_text("{")  # died while writing: no marker
    said = []
    path, state = find_checkpoint("auto", tmp_path, said.append)
    assert path == good and state["step"] == 2
    assert any("skipping incomplete checkpoint" in s and "step-000004" in s for s in said)
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        find_checkpoint(str(tmp_path / "nothing-here"), tmp_path)


class Recording(Trainer):
    """Records the prompt uids of every batch it trains on, and the learner's weights
    right after setup (after a resume: what was loaded)."""

    def setup(self):
        self.trained_uids = []
        super().setup()
        self.start_params = final_params(self)

    def update(self, batch):
        self.trained_uids += [g.prompt.uid for g in ray.get(batch)]  # the batch is an object ref
        return super().update(batch)


class RecordingCrashAt(CrashAt, Recording):
    pass


def test_async_crash_and_resume_trains_each_step_once_and_no_prompt_twice(ray_session, tiny_policy, tmp_path):
    """``max_staleness=1`` is not bit-reproducible, so the resumed run is not compared with
    an uninterrupted one: which weights a worker holds when it takes its next prompts
    depends on whether the learner's publish or the worker's acquire comes first, and
    with it the behaviour log-probs, which batch a group lands in and what is dropped as
    stale. What is exact: the resumed learner starts from the checkpoint's weights bit
    for bit, steps 1..8 each once, every prompt trained at most once across the resume
    (the resume point: the cursor and the uids after it already trained), and each leg's
    accounting."""
    common = ["--train.steps", "8", "--train.max_staleness", "1", "--learner.lr", "1e-2"]
    first, p_first, a = run(small_config(tiny_policy, *common, "--train.checkpoint_every", "2"), tmp_path / "b",
                            RecordingCrashAt)
    point = json.loads((tmp_path / "b" / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    second, _, b = run(small_config(tiny_policy, *common, "--train.resume", "auto"), tmp_path / "b", Recording)
    assert (first["steps"], second["steps"]) == (4, 8) and "resumed from" in b.out.getvalue()
    assert torch.equal(b.start_params, p_first)
    assert set(a.trained_uids) == set(range(point["cursor"])) | set(point["skip"])
    assert len(a.trained_uids) == len(b.trained_uids) == 16
    assert len(set(a.trained_uids + b.trained_uids)) == 32, "a prompt was trained twice"
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    for leg in (first, second):
        assert leg["produced"] == leg["trained"] + leg["dropped"]
    assert first["trained"] == sum(r["samples"] for r in rows[:4])
    assert second["trained"] == sum(r["samples"] for r in rows[4:])


def test_an_interrupted_checkpoint_write_is_skipped_and_replaced(tiny_policy, tmp_path):
    """A real partial folder: ``write_checkpoint`` whose learner save dies after writing
    the policy, before its optimizer state (and so before the marker)."""
    learner = Learner(tiny_policy, LearnerConfig(num_threads=1, lr=1e-2), total_steps=4)
    learner.train_step(recorded_groups(tiny_policy))
    good = write_checkpoint(tmp_path, 2, learner.save_state, {"cursor": 8, "skip": []})

    def dies_midway(path: str) -> None:
        learner.save_policy(os.path.join(path, "policy"))
        raise RuntimeError("learner died while saving")

    with pytest.raises(RuntimeError, match="died while saving"):
        write_checkpoint(tmp_path, 4, dies_midway, {"cursor": 16, "skip": []})
    tmp = tmp_path / "checkpoints" / "step-000004.tmp"
    assert any((tmp / "policy").iterdir()) and not (tmp / "COMPLETE").exists()
    said = []
    path, state = find_checkpoint("auto", tmp_path, said.append)
    assert path == good and state == {"step": 2, "cursor": 8, "skip": []}
    assert any("skipping incomplete checkpoint" in s and s.endswith("step-000004.tmp (no COMPLETE marker)")
               for s in said), said
    resumed = Learner(tiny_policy, LearnerConfig(num_threads=1, lr=1e-2), total_steps=4)
    assert resumed.load_state(str(path)) == 1 and torch.equal(resumed.param_vector(), learner.param_vector())
    # the next write of that step replaces the leftover
    write_checkpoint(tmp_path, 4, learner.save_state, {"cursor": 16, "skip": []})
    assert not tmp.exists() and find_checkpoint("auto", tmp_path)[0].name == "step-000004"


@pytest.mark.parametrize("hidden,layers", [(16, 1), (32, 2)], ids=["other-shapes", "more-layers"])
def test_a_checkpoint_of_another_architecture_is_a_clear_error(tiny_policy, tmp_path, hidden, layers):
    other = tmp_path / "other-policy"
    tok = build_char_tokenizer()
    build_tiny_llama(len(tok), hidden_size=hidden, num_layers=layers, num_heads=2, max_positions=16,
                     seed=0).save_pretrained(other)
    tok.save_pretrained(other)
    saved = write_checkpoint(tmp_path / "run", 2, Learner(str(other), LearnerConfig(num_threads=1),
                                                           total_steps=1).save_state, {"cursor": 8, "skip": []})
    learner = Learner(tiny_policy, LearnerConfig(num_threads=1), total_steps=1)
    with pytest.raises(CheckpointError, match=f"checkpoint {saved} does not match the policy: "
                                              f"{'size mismatch' if layers == 1 else 'missing'}"):
        learner.load_state(str(saved))
