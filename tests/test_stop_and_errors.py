"""Ctrl-C saves the work, and every bad input is one line: ``fleetrl train`` as a real subprocess."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time

import pytest

from tests.conftest import wait_for
from tests.test_cli import FLEETRL, run_cli

SMALL = ["--reward.functions", "['tests.rewards:digit_reward']", "--train.prompts_per_step", "4",
         "--rollout.group_size", "4", "--rollout.prompts_per_request", "2", "--rollout.max_new_tokens", "5",
         "--task.eval_size", "8", "--learner.num_threads", "1", "--no-progress"]


def metrics_steps(run_dir) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def test_sigterm_writes_a_checkpoint_and_summary(ray_session, tiny_policy, tmp_path):
    """SIGTERM (what Kubernetes and Slurm send; Ctrl-C takes the same path) stops after the
    step in flight with a checkpoint of it and summary.json."""
    address = ray_session.get_runtime_context().gcs_address
    run_dir = tmp_path / "run"
    args = ["train", "--address", address, "--output-dir", str(run_dir), "--model.path", tiny_policy, *SMALL]
    proc = subprocess.Popen([*FLEETRL, *args, "--train.steps", "100000", "--train.checkpoint_every", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: len(metrics_steps(run_dir)) >= 5, 180, what="5 training steps")
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=90)
        took = time.monotonic() - t0
    finally:
        proc.kill()
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    assert "SIGTERM: stopping after this step" in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["steps"] >= 5
    assert summary["produced"] == summary["trained"] + summary["dropped"]
    n = summary["steps"]
    assert (run_dir / "checkpoints" / f"step-{n:06d}" / "COMPLETE").exists(), "no final checkpoint of the last step"
    assert took < 60, f"stopping took {took:.0f}s"
    assert metrics_steps(run_dir) == list(range(1, n + 1))
    # (resuming cuts metrics.jsonl back to the checkpoint: test_faults.py's restart test)


def test_a_second_ctrl_c_exits_at_once(ray_session, tiny_policy, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    run_dir, err_path = tmp_path / "run", tmp_path / "stderr"
    args = [a if a != "['tests.rewards:digit_reward']" else "['tests.rewards:slow_reward']"
            for a in SMALL]
    with err_path.open("w") as err_file:
        proc = subprocess.Popen([*FLEETRL, "train", "--address", address, "--output-dir", str(run_dir),
                                 "--model.path", tiny_policy, *args, "--train.steps", "100000"],
                                stdout=subprocess.DEVNULL, stderr=err_file, text=True)
        try:
            wait_for(lambda: len(metrics_steps(run_dir)) >= 1, 180, what="a training step")
            proc.send_signal(signal.SIGINT)
            wait_for(lambda: "stopping after this step" in err_path.read_text(), 30, what="the first Ctrl-C")
            proc.send_signal(signal.SIGINT)
            t0 = time.monotonic()
            proc.wait(timeout=30)
        finally:
            proc.kill()
    err = err_path.read_text()
    assert proc.returncode == 130 and time.monotonic() - t0 < 10, err[-2000:]
    assert "second SIGINT: exiting now" in err and "Traceback" not in err, err[-2000:]
    assert not (run_dir / "summary.json").exists()  # it did not wait for the graceful stop


def _busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


@pytest.mark.parametrize("case", ["non_utf8_yaml", "output_dir_is_a_file", "missing_token_file",
                                  "negative_resource", "missing_model_path", "pickle_only_policy",
                                  "control_port_in_use", "earlier_checkpoints", "missing_data_file",
                                  "unknown_eval_verifier"])
def test_bad_input_is_one_line_before_ray_starts(case, tmp_path, tiny_policy):
    args = ["train", "--output-dir", str(tmp_path / "run")]
    busy = _busy_port()
    if case == "earlier_checkpoints":
        (tmp_path / "run" / "checkpoints" / "step-000004").mkdir(parents=True)
        args += ["--model.path", tiny_policy]
        message = "holds checkpoints of an earlier run"
    elif case == "control_port_in_use":
        args += ["--model.path", tiny_policy, "--control.port", str(busy.getsockname()[1])]
        message = "control.port: cannot bind"
    elif case == "non_utf8_yaml":
        (tmp_path / "c.yaml").write_bytes(b"train:\n  steps: \xff\xfe\n")
        args += [str(tmp_path / "c.yaml")]
        message = "not UTF-8"
    elif case == "output_dir_is_a_file":
        (tmp_path / "file").write_text("x")
        args = ["train", "--output-dir", str(tmp_path / "file")]
        message = "exists and is not a directory"
    elif case == "missing_token_file":
        args += ["--model.path", tiny_policy, "--control.token_file", str(tmp_path / "nope")]
        message = "control.token_file:"
    elif case == "negative_resource":
        args += ["--rollout.resources", "{gpu_node: -1}"]
        message = "rollout.resources: gpu_node"
    elif case == "missing_data_file":
        args += ["--model.path", tiny_policy, "--data.train_files", f"[{tmp_path / 'nope.jsonl'}]"]
        message = "data.train_files: " + str(tmp_path / "nope.jsonl") + ": no such file"
    elif case == "unknown_eval_verifier":
        args += ["--model.path", tiny_policy, "--eval.reward", "mathh"]
        message = "eval.reward: reward.functions: 'mathh' is neither a built-in"
    elif case == "missing_model_path":
        args += ["--model.path", str(tmp_path / "no-such-model")]
        message = "model.path"
    else:
        import shutil

        import torch
        from transformers import AutoModelForCausalLM

        pickled = tmp_path / "pickled"
        shutil.copytree(tiny_policy, pickled)
        torch.save(AutoModelForCausalLM.from_pretrained(tiny_policy).state_dict(), pickled / "pytorch_model.bin")
        (pickled / "model.safetensors").unlink()
        args += ["--model.path", str(pickled)]
        message = "model.allow_pickle"
    t0 = time.monotonic()
    try:
        r = run_cli(*args, timeout=120)
    finally:
        busy.close()
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr[-3000:]
    assert "Started a local Ray instance" not in r.stdout + r.stderr
    assert time.monotonic() - t0 < 60
