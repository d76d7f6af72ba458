"""Checkpoints and exact resume."""

from __future__ import annotations

import io
import json

import pytest
import ray
import torch

from learner.config import ConfigError
from learner.checkpoint import find_checkpoint
from learner.driver.trainer import Trainer
from tests.test_pipeline import small_config


class CrashAt(Trainer):
    """Stops (as if it crashed) right after step ``crash_step``."""

    crash_step = 4

    def update(self, batch):
        m = super().update(batch)
        if self.step + 1 == self.crash_step:
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
