"""Reward models submitted over gRPC while a real training run goes on.

One training run (tiny policy, real Ray, real Control server) runs in a
background thread for the whole module (``training``, started by whichever
test needs it first); each test gets it through ``run``, which checks that no
reward model is registered when the test starts and removes what a failed test
left behind, so the tests pass alone and in any order. Each test registers
reward servers (real gRPC servers on 127.0.0.1) through the Control service
and watches the run's metrics and counters react.
"""

from __future__ import annotations

import io
import math
import threading
from pathlib import Path

import grpc
import pytest
import ray

from actors.serving import ServerConfig, serve
from learner.config import load_config
from learner.driver.trainer import Trainer
from protos import control_pb2, control_pb2_grpc, reward_pb2, reward_pb2_grpc
from tests.conftest import wait_for
from tests.test_protos import _self_signed


# -- reward servers with controllable behaviour ----------------------------------------------------
class ScriptedRewardModel(reward_pb2_grpc.RewardModelServicer):
    """mode: 'const' (score = value), 'nan', 'short' (one score too few), 'hang' (until released)."""

    def __init__(self, mode="const", value=0.25):
        self.mode, self.value = mode, value
        self.calls = 0
        self.release = threading.Event()

    def Score(self, request, context):
        self.calls += 1
        n = len(request.samples)
        if self.mode == "hang":
            self.release.wait(30)
        if self.mode == "nan":
            return reward_pb2.ScoreResponse(scores=[math.nan] * n)
        if self.mode == "short":
            return reward_pb2.ScoreResponse(scores=[self.value] * (n - 1))
        return reward_pb2.ScoreResponse(scores=[self.value] * n)

    def GetMetadata(self, request, context):
        return reward_pb2.ModelMetadata(name="scripted", version="1", kind=self.mode)


def start_reward_server(servicer, port=0, **cfg):
    return serve(ServerConfig(port=port, **cfg),
                 lambda s: reward_pb2_grpc.add_RewardModelServicer_to_server(servicer, s),
                 ["fleetrl.reward.v1.RewardModel"])


# -- one training run for the module ----------------------------------------------------------------
@pytest.fixture(scope="module")
def training(ray_session, tiny_policy, tmp_path_factory):
    checkpoints = tmp_path_factory.mktemp("reward-checkpoints")  # the only place --checkpoint may point
    cfg = load_config(None, ["--control.reward_checkpoint_roots", f"['{checkpoints}']",
        "--model.path", tiny_policy, "--reward.functions", "['tests.rewards:digit_reward']",
        "--reward.colocate", "true",  # registered models still score every group (they live in the reward workers)
        "--train.steps", "100000", "--train.prompts_per_step", "2", "--rollout.group_size", "4",
        "--rollout.prompts_per_request", "1", "--rollout.max_new_tokens", "4", "--task.eval_size", "4",
        "--learner.num_threads", "1", "--train.sample_timeout_s", "300", "--train.max_wall_s", "600"])
    trainer = Trainer(cfg, tmp_path_factory.mktemp("control-run"), out=io.StringIO(), progress=False)
    result = {}

    def target():
        try:
            result["summary"] = trainer.train()
        except BaseException as e:  # noqa: BLE001 - surfaced by the tests
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    wait_for(lambda: trainer.control is not None and trainer.step >= 2 or "error" in result, 120, what="training")
    assert "error" not in result, result.get("error")
    stub = control_pb2_grpc.ControlStub(grpc.insecure_channel(trainer.control.address))
    yield trainer, stub, result
    trainer.stop_requested.set()
    thread.join(120)
    trainer.shutdown()
    assert "error" not in result, result.get("error")
    s = result["summary"]
    assert s["produced"] == s["trained"] + s["dropped"]


@pytest.fixture
def run(training):
    """The module's training run, with no run-time reward model registered; cleaned up afterwards."""
    trainer, stub, result = training
    assert "error" not in result, result.get("error")
    assert list_names(stub) == [], "a previous test left reward models registered"
    yield training
    for name in list_names(stub):
        stub.RemoveRewardModel(control_pb2.RemoveRewardModelRequest(name=name), timeout=60)


def list_names(stub) -> list[str]:
    return [m.spec.name for m in stub.ListRewardModels(control_pb2.ListRewardModelsRequest(), timeout=30).models]


def register(stub, name, endpoint, weight=1.0, timeout_s=5.0, **spec):
    return stub.RegisterRewardModel(control_pb2.RegisterRewardModelRequest(spec=control_pb2.RewardModelSpec(
        name=name, endpoint=endpoint, weight=weight, timeout_s=timeout_s, batch_size=16, **spec)), timeout=60)


def rows_after(trainer, step):
    return [r for r in trainer.history if r["step"] > step]


def info(stub, name):
    models = {m.spec.name: m for m in stub.ListRewardModels(control_pb2.ListRewardModelsRequest(), timeout=30).models}
    return models.get(name)


def test_register_changes_the_combined_reward_then_remove(run):
    trainer, stub, _ = run
    servicer = ScriptedRewardModel("const", value=0.25)
    server = start_reward_server(servicer)
    try:
        step0 = trainer.step
        reply = register(stub, "judge", server.address, weight=2.0)
        assert reply.model.healthy and reply.model.spec.endpoint == server.address
        wait_for(lambda: any("judge" in r["reward_by_name"] for r in rows_after(trainer, step0)), 60,
                 what="the registered model's score in the metrics")
        first = next(r for r in rows_after(trainer, step0) if "judge" in r["reward_by_name"])["step"]
        # groups scored before the registration may still be in flight for a few batches
        wait_for(lambda: rows_after(trainer, first + 4), 60, what="batches scored entirely after registration")
        row = rows_after(trainer, first + 4)[0]
        by_name = row["reward_by_name"]
        assert by_name["judge"] == pytest.approx(0.25)
        # combined reward = weighted sum of every function's score, sample by sample
        assert row["reward_mean"] == pytest.approx(by_name["tests.rewards:digit_reward"] + 2.0 * 0.25, abs=1e-5)
        status = stub.GetStatus(control_pb2.GetStatusRequest(), timeout=10)
        assert status.step >= row["step"] and status.rollout_workers == 2 and status.produced >= status.trained
        assert status.last_eval.step == 0 and 0 <= status.last_eval.metrics["greedy_accuracy"] <= 1  # before RL
        assert status.data.size == 0  # a built-in task: no dataset position
        assert info(stub, "judge").scored > 0
        stub.RemoveRewardModel(control_pb2.RemoveRewardModelRequest(name="judge"), timeout=30)
        step1 = trainer.step
        wait_for(lambda: len(rows_after(trainer, step1 + 4)) >= 2, 60, what="training to continue after removal")
        assert all("judge" not in r["reward_by_name"] for r in rows_after(trainer, step1 + 4))
        assert info(stub, "judge") is None
    finally:
        server.stop(0)


def test_control_status_codes(run, tmp_path):
    trainer, stub, _ = run
    server = start_reward_server(ScriptedRewardModel())
    dead = start_reward_server(ScriptedRewardModel())
    dead_address = dead.address
    dead.stop(0)
    try:
        echoed = register(stub, "dup", server.address, max_attempts=2, failure_threshold=5, cooldown_s=1.5).model.spec
        assert (echoed.max_attempts, echoed.failure_threshold, echoed.cooldown_s, echoed.tls_ca_pem) == (2, 5, 1.5, b"")
        cases = [
            (lambda: register(stub, "unreachable", dead_address, timeout_s=2), grpc.StatusCode.FAILED_PRECONDITION),
            (lambda: register(stub, "dup", server.address), grpc.StatusCode.ALREADY_EXISTS),
            (lambda: stub.RemoveRewardModel(control_pb2.RemoveRewardModelRequest(name="nope"), timeout=10),
             grpc.StatusCode.NOT_FOUND),
            (lambda: register(stub, "bad-endpoint", "no-port-here"), grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: register(stub, "", server.address), grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: stub.RegisterRewardModel(control_pb2.RegisterRewardModelRequest(spec=control_pb2.RewardModelSpec(
                name="ckpt", checkpoint_dir=str(tmp_path / "missing"))), timeout=30),
             grpc.StatusCode.PERMISSION_DENIED),
            (lambda: stub.RegisterRewardModel(control_pb2.RegisterRewardModelRequest(spec=control_pb2.RewardModelSpec(
                name="ckpt", checkpoint_dir=str(Path(trainer.cfg.control.reward_checkpoint_roots[0]) / "missing"))),
                timeout=30), grpc.StatusCode.FAILED_PRECONDITION),
            (lambda: register(stub, "foreign", f"127.0.0.2:{server.port}"), grpc.StatusCode.PERMISSION_DENIED),
            (lambda: register(stub, "metadata", "169.254.169.254:80"), grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: register(stub, "neg-timeout", server.address, timeout_s=-1), grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: register(stub, "attempts", server.address, max_attempts=11), grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: register(stub, "threshold", server.address, failure_threshold=-1),
             grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: register(stub, "cooldown", server.address, cooldown_s=-1.0), grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: register(stub, "ca", server.address, tls_ca_pem=b"not a certificate"),
             grpc.StatusCode.INVALID_ARGUMENT),
            (lambda: stub.ScaleRollout(control_pb2.ScaleRolloutRequest(num_workers=0), timeout=10),
             grpc.StatusCode.INVALID_ARGUMENT),
        ]
        for call, code in cases:
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == code, e.value.details()
        assert [m.spec.name for m in stub.ListRewardModels(control_pb2.ListRewardModelsRequest(), timeout=30).models] \
            == ["dup"], "a refused registration must leave nothing behind"
    finally:
        try:
            stub.RemoveRewardModel(control_pb2.RemoveRewardModelRequest(name="dup"), timeout=30)
        finally:
            server.stop(0)


def flagged(trainer, reason: str) -> int:
    return ray.get(trainer.coordinator.stats.remote())["dropped_by_reason"].get(reason, 0)


def digest(trainer) -> str:
    return ray.get(trainer.learner.weights_digest.remote())


def paused(trainer) -> str:
    return ray.get(trainer.coordinator.stats.remote())["paused"]


@pytest.mark.parametrize("mode, reason", [("hang", "reward_timeout"), ("nan", "reward_nonfinite"),
                                          ("short", "reward_count")])
def test_bad_reward_server_flags_samples_and_training_resumes(run, mode, reason):
    """A bad server's samples are flagged, never scored; once its circuit opens rollout pauses
    (nothing is generated only to be dropped) and the learner stands still; removing the
    model resumes training."""
    trainer, stub, _ = run
    servicer = ScriptedRewardModel(mode)
    server = start_reward_server(servicer)
    try:
        before = flagged(trainer, reason)
        register(stub, f"bad-{mode}", server.address, timeout_s=1.0)
        wait_for(lambda: flagged(trainer, reason) > before, 90, what=f"samples dropped as {reason}")
        first = trainer.step
        wait_for(lambda: paused(trainer), 90, what="rollout to pause (the circuit opened)")
        assert stub.GetStatus(control_pb2.GetStatusRequest(), timeout=30).paused  # `fleetrl status` says why
        model = info(stub, f"bad-{mode}")
        assert not model.healthy and model.failed > 0 and model.last_error.startswith(reason), model
        assert not model.disabled  # reward.model_disable_after_s has not passed
        step = trainer.step
        assert step <= first + 2  # at most the batches already assembled before it took effect
        # no trained sample ever carried a score from the bad server: its batches never reached the learner
        assert all(f"bad-{mode}" not in r["reward_by_name"] for r in trainer.history)
        servicer.release.set()
        stub.RemoveRewardModel(control_pb2.RemoveRewardModelRequest(name=f"bad-{mode}"), timeout=60)
        wait_for(lambda: trainer.step >= step + 3, 120, what="training to resume")
        assert not paused(trainer)
        assert stub.GetStatus(control_pb2.GetStatusRequest(), timeout=30).paused == ""
    finally:
        servicer.release.set()
        server.stop(0)


def test_a_tls_reward_server_registered_at_run_time(run, tmp_path):
    """The CA certificate travels in the registration (tls_ca_pem); without it, nothing is added."""
    trainer, stub, _ = run
    cert, key = _self_signed(tmp_path)
    server = start_reward_server(ScriptedRewardModel("const", value=0.125), tls_cert=cert, tls_key=key)
    try:
        with pytest.raises(grpc.RpcError) as e:  # plaintext against a TLS server
            register(stub, "tls", server.address)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value.details()
        assert list_names(stub) == []
        pem = Path(cert).read_bytes()
        reply = register(stub, "tls", server.address, tls_ca_pem=pem, max_attempts=2, failure_threshold=4,
                         cooldown_s=1.5)
        assert reply.model.healthy and reply.model.spec.tls_ca_pem == pem
        assert (reply.model.spec.max_attempts, reply.model.spec.failure_threshold) == (2, 4)
        step = trainer.step
        wait_for(lambda: any("tls" in r["reward_by_name"] for r in rows_after(trainer, step)), 90,
                 what="the TLS reward server's score in the metrics")
        row = next(r for r in rows_after(trainer, step) if "tls" in r["reward_by_name"])
        assert row["reward_by_name"]["tls"] == pytest.approx(0.125)
        assert info(stub, "tls").scored > 0 and info(stub, "tls").failed == 0
        stub.RemoveRewardModel(control_pb2.RemoveRewardModelRequest(name="tls"), timeout=60)
    finally:
        server.stop(0)


def test_crashed_reward_server_opens_the_circuit_and_recovers(run):
    trainer, stub, _ = run
    servicer = ScriptedRewardModel("const", value=0.5)
    server = start_reward_server(servicer)
    port = server.port
    try:
        register(stub, "flaky", server.address, timeout_s=2.0)
        wait_for(lambda: info(stub, "flaky").scored > 0, 60, what="first scores")
        server.stop(0)  # the server crashes mid-run
        wait_for(lambda: not info(stub, "flaky").healthy, 120, what="circuit to open")
        m = info(stub, "flaky")
        assert m.failed > 0 and m.last_error.split(":")[0] in ("reward_unavailable", "reward_timeout")
        server = start_reward_server(servicer, port=port)  # it comes back on the same address
        wait_for(lambda: info(stub, "flaky").healthy, 120, what="circuit to close")
        step = trainer.step
        wait_for(lambda: any("flaky" in r["reward_by_name"] for r in rows_after(trainer, step)), 120,
                 what="scores from the recovered server in training")
        stub.RemoveRewardModel(control_pb2.RemoveRewardModelRequest(name="flaky"), timeout=60)
    finally:
        server.stop(0)


def _cli(*args, timeout=400):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "learner.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_hf_reward_model_served_by_the_cli_and_used_in_training(run, tmp_path):
    """`fleetrl reward serve --model DIR` + `fleetrl reward add/list/remove` + `fleetrl status`."""
    import json
    import signal
    import subprocess
    import sys

    from actors.reward.hf import build_tiny_reward_model

    trainer, stub, _ = run
    model_dir = build_tiny_reward_model(Path(trainer.cfg.control.reward_checkpoint_roots[0]) / "rm")
    server = subprocess.Popen([sys.executable, "-m", "learner.cli", "reward", "serve", "--model", str(model_dir),
                               "--port", "0", "--name", "tiny-rm"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        lines = []
        reader = threading.Thread(target=lambda: lines.append(server.stdout.readline()), daemon=True)
        reader.start()  # the server prints its address once it is serving
        reader.join(120)
        line = lines[0] if lines else ""
        assert "listening on" in line, f"no address line within 120 s: {line!r}"
        address = line.split()[-1]
        control = trainer.control.address
        r = _cli("reward", "add", "hf", "--endpoint", address, "--weight", "0.5", "--max-attempts", "2",
                 "--failure-threshold", "4", "--cooldown", "1.5", "--control", control)
        assert r.returncode == 0, r.stderr
        added = json.loads(r.stdout)["spec"]
        assert (added["endpoint"], added["max_attempts"], added["failure_threshold"], added["cooldown_s"]) \
            == (address, 2, 4, 1.5)
        bad = _cli("reward", "add", "hf2", "--endpoint", address, "--max-attempts", "11", "--control", control)
        assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "max_attempts" in bad.stderr
        step = trainer.step
        wait_for(lambda: any("hf" in row["reward_by_name"] for row in rows_after(trainer, step)), 90,
                 what="the served HF reward model's score in training")
        listed = json.loads(_cli("reward", "list", "--control", control).stdout)
        hf = next(m for m in listed if m["spec"]["name"] == "hf")
        assert hf["healthy"] and int(hf["scored"]) > 0
        status = json.loads(_cli("status", "--control", control).stdout)
        assert int(status["step"]) >= step and int(status["produced"]) >= int(status["trained"]) > 0
        assert status["rollout_workers"] == 2
        again = _cli("reward", "add", "hf", "--endpoint", address, "--control", control)
        assert again.returncode == 1 and "ALREADY_EXISTS" in again.stderr
        assert _cli("reward", "remove", "hf", "--control", control).returncode == 0
        # the same checkpoint as a local target (no server): loaded in a reward-model actor
        r = _cli("reward", "add", "hf-local", "--checkpoint", str(model_dir), "--control", control)
        assert r.returncode == 0, r.stderr
        step = trainer.step
        wait_for(lambda: any("hf-local" in row["reward_by_name"] for row in rows_after(trainer, step)), 90,
                 what="the local HF reward model's score in training")
        assert _cli("reward", "remove", "hf-local", "--control", control).returncode == 0
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0


def test_trainer_calls_an_authenticated_reward_server_with_its_token(run, monkeypatch):
    trainer, stub, _ = run
    monkeypatch.setenv("FLEETRL_TOKEN", "shared-secret")  # the reward server requires it from now on
    servicer = ScriptedRewardModel("const", value=0.75)
    server = start_reward_server(servicer)
    try:
        assert server.authenticated
        # the trainer does not hand out its own Control token: without a reward token, registration fails
        with pytest.raises(grpc.RpcError) as e:
            register(stub, "authed", server.address)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "UNAUTHENTICATED" in e.value.details()
        monkeypatch.setenv("FLEETRL_REWARD_TOKEN", "shared-secret")
        anonymous = reward_pb2_grpc.RewardModelStub(grpc.insecure_channel(server.address))
        with pytest.raises(grpc.RpcError) as e:
            anonymous.Score(reward_pb2.ScoreRequest(samples=[reward_pb2.Sample(prompt="1=", completion="1")]),
                            timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        register(stub, "authed", server.address)
        wait_for(lambda: info(stub, "authed").scored > 0, 60, what="scores from the authenticated server")
        assert info(stub, "authed").failed == 0
        stub.RemoveRewardModel(control_pb2.RemoveRewardModelRequest(name="authed"), timeout=60)
    finally:
        server.stop(0)


def test_a_foreign_reward_server_gets_its_own_token_not_the_runs(run, monkeypatch, tmp_path):
    """127.0.0.2 is not in control.allowed_reward_endpoints: without its own token it is refused and
    never contacted; `reward add --reward-token-file` registers it, and only that token reaches it."""
    from tests.test_control_abuse import RecordingRewardModel
    from tests.test_control_abuse import start_reward_server as start_on

    trainer, stub, _ = run
    monkeypatch.setenv("FLEETRL_REWARD_TOKEN", "run-secret")
    recording = RecordingRewardModel()
    server = start_on(recording, host="127.0.0.2")
    try:
        with pytest.raises(grpc.RpcError) as e:
            register(stub, "foreign", server.address)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED and recording.auth == []
        token = tmp_path / "token"
        token.write_text("model-secret\n")
        r = _cli("reward", "add", "foreign", "--endpoint", server.address, "--reward-token-file", str(token),
                 "--control", trainer.control.address)
        assert r.returncode == 0, r.stderr
        assert "model-secret" not in r.stdout
        step = trainer.step
        wait_for(lambda: any("foreign" in row["reward_by_name"] for row in rows_after(trainer, step)), 90,
                 what="the foreign server's score in training")
        assert len(recording.auth) > 1 and set(recording.auth) == {"Bearer model-secret"}
        stub.RemoveRewardModel(control_pb2.RemoveRewardModelRequest(name="foreign"), timeout=60)
    finally:
        server.stop(0)
