"""The ``fleetrl`` command line, run as a real subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

FLEETRL = [sys.executable, "-m", "learner.cli"]


def run_cli(*args, timeout=600, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([*FLEETRL, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("args, message", [
    (["train", "--learner.lrr", "1e-4"], "learner.lrr: unknown key"),
    (["train", "--train.steps", "zero"], "train.steps: expected an integer"),
    (["train", "--rollout.temperature=-1"], "rollout.temperature: must be >= 0"),
    (["train", "no-such-file.yaml"], "does not exist"),
    (["train", "--bogus"], "unknown option --bogus"),
    (["frobnicate"], "unknown command"),
])
def test_bad_invocations_exit_2_with_a_message(args, message):
    r = run_cli(*args, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr


def test_config_prints_resolved_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 5\n")
    r = run_cli("config", str(f), "--learner.lr=0.001", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "steps: 5" in r.stdout and "lr: 0.001" in r.stdout


@pytest.mark.slow
def test_default_job_through_the_cli_runs_end_to_end(ray_session, fleetrl_cache, tmp_path):
    """`fleetrl train` on the embedded defaults (built-in policy, warm start, async), attached to
    the session's Ray cluster, shortened to 20 steps. That these defaults learn is
    tests/test_dataset_runs.py's learning test: the same settings for 300 steps, the prompts of
    the same task read from a JSONL file (one learning run in the suite, not two)."""
    address = ray_session.get_runtime_context().gcs_address
    out = tmp_path / "run"
    r = run_cli("train", "--address", address, "--output-dir", str(out), "--no-progress",
                "--train.steps", "20", env_extra={"FLEETRL_CACHE": str(fleetrl_cache)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("eval_before", "eval_after", "steps", "wall_s", "samples_per_s", "produced", "trained", "dropped",
                "final_policy_version", "policy_dir"):
        assert key in summary
    assert summary["produced"] == summary["trained"] + summary["dropped"]
    assert summary["final_policy_version"] == summary["steps"] == 20
    assert summary["trained"] == 20 * 16 * 8  # the default step: 16 prompts x 8 samples
    assert 0.2 <= summary["eval_before"] <= 0.4  # the built-in policy's warm start stops at 0.3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == summary["steps"] and all(r["staleness_max"] <= 1 for r in rows)
    assert any(r["staleness_max"] == 1 for r in rows), "the default job is asynchronous (max_staleness 1)"
    assert (out / "policy" / "model.safetensors").exists() and (out / "policy" / "tokenizer.json").exists()
    assert "built-in policy:" in r.stdout
    assert "held-out evaluation after RL (200 prompts, policy_version" in r.stdout
