"""A hostile Control client cannot misuse the trainer (issue 11, points 3, 4, 5 and 9).

Everything is real: Control servers are ``start_control_server`` around a real
``RewardRegistry`` (no training run: ``status_fn`` is a lambda), reward servers
are real gRPC servers -- on 127.0.0.1, or on 127.0.0.2 for a host outside
``control.allowed_reward_endpoints`` -- that record the ``authorization``
metadata they receive, and reward-model actors run on the session's local Ray.
The endpoint, checkpoint and token rules are checked on the plain functions.
"""

from __future__ import annotations

import pickle
import threading
import time
from pathlib import Path

import grpc
import pytest
import ray

from actors.reward.models import RewardModelSpec
from actors.serving import ServerConfig, serve
from learner.config import ControlConfig
from learner.control.registry import RewardRegistry
from learner.control.rules import ControlError, parse_allowed, validate_spec
from learner.control.service import start_control_server
from protos import control_pb2, control_pb2_grpc, reward_pb2, reward_pb2_grpc
from tests.conftest import wait_for


class RecordingRewardModel(reward_pb2_grpc.RewardModelServicer):
    """Scores 0.5; records the authorization header of every call; GetMetadata hangs
    until ``release`` is set when ``hang``."""

    def __init__(self, hang: bool = False):
        self.hang, self.release = hang, threading.Event()
        self.auth: list[str] = []

    def _record(self, context) -> None:
        self.auth.append(dict(context.invocation_metadata()).get("authorization", ""))

    def GetMetadata(self, request, context):
        self._record(context)
        if self.hang:
            self.release.wait(120)
        return reward_pb2.ModelMetadata(name="recording", version="1", kind="test")

    def Score(self, request, context):
        self._record(context)
        return reward_pb2.ScoreResponse(scores=[0.5] * len(request.samples))


def start_reward_server(servicer, host="127.0.0.1", **cfg):
    return serve(ServerConfig(host=host, **cfg), lambda s: reward_pb2_grpc.add_RewardModelServicer_to_server(
        servicer, s), ["fleetrl.reward.v1.RewardModel"])


@pytest.fixture
def servers():
    """Start reward servers with ``servers(servicer, host=...)``; all stopped (and released) afterwards."""
    started = []

    def start(servicer, host="127.0.0.1", **cfg):
        started.append((servicer, start_reward_server(servicer, host, **cfg)))
        return started[-1][1]

    yield start
    for servicer, server in started:
        servicer.release.set()
        server.stop(0)


@pytest.fixture
def control(ray_session):
    """``control(reward_actors=(), server=ServerConfig(), scale_fn=None, **ControlConfig fields)``
    -> (stub, registry, address): a real Control server; closed afterwards."""
    made = []

    def make(reward_actors=(), server=None, scale_fn=None, **cfg):
        registry = RewardRegistry(list(reward_actors), reserved_names=["builtin"], control=ControlConfig(**cfg))
        running = start_control_server(registry, lambda: {"step": 3, "rollout_workers": 2},
                                       server or ServerConfig(port=0), scale_fn=scale_fn)
        made.append((registry, running))
        return control_pb2_grpc.ControlStub(grpc.insecure_channel(running.address)), registry, running.address

    yield make
    for registry, running in made:
        running.stop(grace_s=0, lame_duck_s=0)
        registry.close()


def register(stub, name, endpoint="", timeout=60, **spec):
    spec = {"timeout_s": 5.0, **({"endpoint": endpoint} if endpoint else {}), **spec}
    return stub.RegisterRewardModel(control_pb2.RegisterRewardModelRequest(spec=control_pb2.RewardModelSpec(
        name=name, **spec)), timeout=timeout)


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value


def listed(stub) -> dict:
    return {m.spec.name: m for m in stub.ListRewardModels(control_pb2.ListRewardModelsRequest(), timeout=30).models}


# -- 3: the reward token goes only where the operator allowed -----------------------------------
def test_run_token_is_sent_only_to_allowed_endpoints(control, servers, monkeypatch):
    monkeypatch.setenv("FLEETRL_REWARD_TOKEN", "run-secret")
    hostile = RecordingRewardModel()
    foreign = servers(hostile, host="127.0.0.2")  # loopback, but not in the default allow-list
    stub, _, _ = control()
    e = refused(lambda: register(stub, "foreign", foreign.address))
    assert e.code() == grpc.StatusCode.PERMISSION_DENIED and "control.allowed_reward_endpoints" in e.details()
    assert hostile.auth == [], "a refused endpoint must not even be contacted"
    # with its own token it is accepted, and only that token travels; it is never echoed
    reply = register(stub, "foreign", foreign.address, token="model-secret")
    assert reply.model.healthy and reply.model.spec.token == "" and listed(stub)["foreign"].spec.token == ""
    assert hostile.auth == ["Bearer model-secret"]
    # allowed by host:port, the run's token is used; the same host on another port is not allowed
    stub2, _, _ = control(allowed_reward_endpoints=[foreign.address])
    register(stub2, "allowed", foreign.address)
    assert hostile.auth[-1] == "Bearer run-secret"
    other = f"127.0.0.2:{foreign.port % 65535 + 1}"
    assert refused(lambda: register(stub2, "other-port", other)).code() == grpc.StatusCode.PERMISSION_DENIED
    assert "run-secret" not in str(stub2.ListRewardModels(control_pb2.ListRewardModelsRequest(), timeout=30))


def test_allow_list_entries_are_hosts_or_endpoints():
    assert parse_allowed(["127.0.0.1", "::1", "[::1]:7", "LocalHost", "rm.internal:443"]) == \
        [("127.0.0.1", None), ("::1", None), ("::1", 7), ("localhost", None), ("rm.internal", 443)]
    with pytest.raises(ValueError, match="control.allowed_reward_endpoints"):
        parse_allowed(["http://rm:80"])
    with pytest.raises(ValueError, match="control.allowed_reward_endpoints"):
        RewardRegistry([], control=ControlConfig(allowed_reward_endpoints=["169.254.169.254"]))


REFUSED = ["unix:/var/run/docker.sock:1", "dns:///x:443", "169.254.169.254:80", "a b:1", "unix:1", "dns:443",
           "ipv4:1.2.3.4:80", "[fe80::1]:80", "0.0.0.0:80", "[::]:80", "224.0.0.1:80", "[ff02::1]:80",
           "[::ffff:169.254.169.254]:80", "host:0", "host:65536", "host:", ":80", "user@host:80", "host/x:80",
           "::1:80", "2130706433:80", "1.2.3:80", "-bad.example:80", "a..b:80", "host.:80", "a_b:1",
           "x" * 64 + ".com:80", "host:+80", "host:٨٠", "[::1%lo]:80", "[::1]", "no-port-here"]


@pytest.mark.parametrize("endpoint", REFUSED)
def test_endpoint_must_be_a_plain_host_and_port(endpoint):
    with pytest.raises(ControlError) as e:
        validate_spec(RewardModelSpec(name="x", endpoint=endpoint))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "\n" not in str(e.value)


@pytest.mark.parametrize("endpoint", ["127.0.0.1:50051", "[::1]:50051", "reward.internal:443", "localhost:1",
                                      "My-Host.example.com:65535", "[2001:db8::1]:8080"])
def test_well_formed_endpoints_pass(endpoint):
    validate_spec(RewardModelSpec(name="x", endpoint=endpoint))


# -- 4: no filesystem probing through --checkpoint ----------------------------------------------
def fake_checkpoint(path: Path, *extra: str) -> Path:
    """A folder check_checkpoint accepts (it never deserialises: contents need not be real)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"weights")
    for name in extra:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(b"pickle")
    return path


def refusal(registry, path) -> ControlError:
    with pytest.raises(ControlError) as e:
        registry.register(RewardModelSpec(name="ckpt", checkpoint_dir=str(path)))
    return e.value


def test_checkpoints_only_under_the_configured_roots(tmp_path):
    home = tmp_path / "home"
    fake_checkpoint(home / "ckpt", "secret_name.pth", "deep/er/more.pkl")
    e = refusal(RewardRegistry([]), home)  # default: no roots
    assert e.code == grpc.StatusCode.PERMISSION_DENIED and "control.reward_checkpoint_roots" in str(e)
    assert "secret_name" not in str(e) and "more.pkl" not in str(e)
    root = tmp_path / "roots" / "rm"
    registry = RewardRegistry([], control=ControlConfig(reward_checkpoint_roots=[str(root)]))
    (root / "escape").parent.mkdir(parents=True)
    (root / "escape").symlink_to(home / "ckpt")  # inside by name, outside by realpath
    answers = {p: refusal(registry, p) for p in (home, home / "ckpt", tmp_path / "nope", root / "escape",
                                                 root.parent / "rm-sibling")}
    for p, e in answers.items():  # the same answer whether or not the path exists
        assert e.code == grpc.StatusCode.PERMISSION_DENIED, (p, e)
        assert str(e).replace(str(p), "P") == "checkpoint_dir 'P' is not under control.reward_checkpoint_roots"
    # inside a root: only the top level, what transformers loads; nothing listed back
    e = refusal(registry, fake_checkpoint(root / "pickled", "secret_name.pt"))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and "pickle" in str(e) and "secret_name" not in str(e)
    e = refusal(registry, root / "missing")
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and "no such directory" in str(e)


@pytest.mark.parametrize("case, reason", [
    ("pickle-suffix", "pickle"), ("symlinked-bin", "pickle"), ("symlinked-folder", "pickle"),
    ("shard-outside", "not a *.safetensors file in the folder"), ("shard-missing", "missing"),
    ("no-weights", "no *.safetensors"), ("config-device", "no config.json")])
def test_check_checkpoint_follows_what_transformers_loads(tmp_path, case, reason):
    from actors.reward.hf import check_checkpoint

    ckpt = fake_checkpoint(tmp_path / "ckpt")
    outside = fake_checkpoint(tmp_path / "elsewhere", "training_args.bin")
    if case == "pickle-suffix":
        (ckpt / "optimizer.pickle").write_bytes(b"pickle")
    elif case == "symlinked-bin":
        (ckpt / "pytorch_model.bin").symlink_to(outside / "training_args.bin")
    elif case == "symlinked-folder":
        ckpt = tmp_path / "link"
        ckpt.symlink_to(outside, target_is_directory=True)
    elif case.startswith("shard"):
        (ckpt / "model.safetensors").unlink()
        shard = "../elsewhere/model.safetensors" if case == "shard-outside" else "model-00001-of-00002.safetensors"
        (ckpt / "model.safetensors.index.json").write_text(f'{{"weight_map": {{"w": "{shard}"}}}}')
    elif case == "no-weights":
        (ckpt / "model.safetensors").rename(ckpt / "other.safetensors")
    elif case == "config-device":
        (ckpt / "config.json").unlink()
        (ckpt / "config.json").symlink_to("/dev/zero")  # never read
    with pytest.raises(ValueError) as e:
        check_checkpoint(ckpt)
    assert reason in str(e.value) and "training_args" not in str(e.value)


def test_check_checkpoint_accepts_shards_and_ignores_subfolders(tmp_path):
    from actors.reward.hf import check_checkpoint

    ckpt = fake_checkpoint(tmp_path / "ckpt", "old/pytorch_model.bin")  # transformers never loads a subfolder
    (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00001.safetensors")
    (ckpt / "model.safetensors.index.json").write_text('{"weight_map": {"w": "model-00001-of-00001.safetensors"}}')
    check_checkpoint(ckpt)


# -- 5: bounded scale targets, probes, model count ------------------------------------------------
def test_scale_targets_are_bounded(control):
    from actors.rollout.worker import RolloutConfig
    from learner.driver.fleet import RolloutFleet

    def fleet(**cfg):
        return RolloutFleet("unused", RolloutConfig(**cfg), coordinator=None, default_max_new_tokens=4, seed=0)

    with pytest.raises(ControlError) as e:  # the session's Ray has 2 CPUs: at most 20 workers of 0.1
        fleet(num_cpus=0.1).request_scale(300)
    assert e.value.code == grpc.StatusCode.OUT_OF_RANGE
    assert "300 requested, at most" in str(e.value) and "rollout.max_workers" in str(e.value)
    assert fleet(num_cpus=0.1).request_scale(1) == 1
    with pytest.raises(ControlError, match="at most 0"):
        fleet(num_cpus=1.5, resources={"no_such_node": 1}).request_scale(1)
    capped = fleet(num_cpus=0.1, max_workers=3)
    with pytest.raises(ControlError, match=r"4 requested, at most 3 \(rollout\.max_workers=3\)"):
        capped.request_scale(4)
    assert capped.request_scale(3) == 3
    stub, _, _ = control(scale_fn=fleet(num_cpus=0.1).request_scale)
    e = refused(lambda: stub.ScaleRollout(control_pb2.ScaleRolloutRequest(num_workers=300), timeout=30))
    assert e.code() == grpc.StatusCode.OUT_OF_RANGE and "at most" in e.details()


def test_a_hanging_probe_blocks_nothing_and_models_are_capped(control, servers):
    hanging = RecordingRewardModel(hang=True)
    server = servers(hanging)
    stub, _, _ = control(max_reward_models=3, probe_timeout_s=90, server=ServerConfig(port=0, max_workers=3))
    pending = [stub.RegisterRewardModel.future(control_pb2.RegisterRewardModelRequest(
        spec=control_pb2.RewardModelSpec(name=f"slow-{i}", endpoint=server.address, timeout_s=60)), timeout=120)
        for i in range(3)]
    wait_for(lambda: len(hanging.auth) == 3, 90, what="three probes in flight at once")
    start = time.monotonic()
    assert stub.GetStatus(control_pb2.GetStatusRequest(), timeout=5).step == 3
    assert listed(stub) == {}  # pending registrations are not listed
    e = refused(lambda: register(stub, "fourth", server.address, timeout=5))
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "control.max_reward_models=3" in e.details()
    assert time.monotonic() - start < 5 and not any(f.done() for f in pending)
    hanging.release.set()
    assert all(f.result(timeout=60).model.healthy for f in pending)
    assert sorted(listed(stub)) == ["slow-0", "slow-1", "slow-2"]


def test_a_probe_that_does_not_answer_times_out(control, servers):
    server = servers(RecordingRewardModel(hang=True))
    stub, _, _ = control(probe_timeout_s=1.5)
    start = time.monotonic()
    e = refused(lambda: register(stub, "silent", server.address, timeout_s=60))
    assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "control.probe_timeout_s=1.5s" in e.details()
    assert time.monotonic() - start < 30 and listed(stub) == {}


# -- 9: failures are one clean line ------------------------------------------------------------
def test_probe_raises_a_picklable_error():
    from actors.reward.client import ProbeError, RemoteRewardClient

    dead = start_reward_server(RecordingRewardModel())
    address = dead.address
    dead.stop(0)
    with pytest.raises(ProbeError) as e:
        RemoteRewardClient(RewardModelSpec(name="x", endpoint=address, timeout_s=2)).probe()
    again = pickle.loads(pickle.dumps(e.value))
    assert (again.code, again.details) == ("UNAVAILABLE", e.value.details) and str(again).startswith("UNAVAILABLE: ")


def test_registration_failures_are_one_clean_line(control, servers, monkeypatch, tiny_policy):
    dead = start_reward_server(RecordingRewardModel())
    dead_address = dead.address
    dead.stop(0)
    monkeypatch.setenv("FLEETRL_TOKEN", "right")
    authed = servers(RecordingRewardModel())
    monkeypatch.delenv("FLEETRL_TOKEN")
    stub, registry, control_address = control(reward_checkpoint_roots=[str(Path(tiny_policy).parent)])
    cases = {"UNAVAILABLE": lambda: register(stub, "unreachable", dead_address),
             "UNAUTHENTICATED": lambda: register(stub, "wrong-token", authed.address, token="wrong"),
             "UNIMPLEMENTED": lambda: register(stub, "not-a-reward-server", control_address),
             "exactly 1": lambda: register(stub, "two-labels", checkpoint_dir=str(tiny_policy))}
    for expected, call in cases.items():
        e = refused(call)
        d = e.details()
        assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, (expected, d)
        assert expected in d and "is not usable" in d, d
        assert "\x1b" not in d and "\n" not in d and "Traceback" not in d and "ray::" not in d and len(d) < 400, d
    assert listed(stub) == {} and registry.pending == set()


# -- the supervisor's calls ----------------------------------------------------------------------
def model_names(worker) -> list[str]:
    return ray.get(worker.__ray_call__.remote(lambda self: [m[0] for m in self.worker.models]), timeout=30)


def test_disable_health_and_new_reward_workers(control, servers):
    from actors.reward.worker import RewardConfig
    from actors.runtime.actors import create_reward_actor

    cfg = RewardConfig(functions=["tests.rewards:digit_reward"], num_cpus=0)
    first, second = create_reward_actor(cfg), create_reward_actor(cfg)
    try:
        stub, registry, _ = control(reward_actors=[first])
        a, b = servers(RecordingRewardModel()), servers(RecordingRewardModel())
        register(stub, "a", a.address)
        register(stub, "b", b.address)
        assert model_names(first) == ["a", "b"] and registry.health() == {"a": True, "b": True}
        ray.kill(registry.models["b"].handle)  # its actor dies: unhealthy, not waited for
        wait_for(lambda: registry.health() == {"a": True, "b": False}, 30, what="b's dead actor reported")
        registry.disable("a", "unhealthy for 30s")
        assert model_names(first) == ["b"] and registry.health() == {"b": False}
        m = listed(stub)["a"]
        assert m.disabled and m.disabled_reason == "unhealthy for 30s" and not m.healthy
        assert not listed(stub)["b"].disabled
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(registry.models["a"].handle.info.remote(), timeout=30)
        with pytest.raises(ControlError) as e:
            registry.disable("nope", "x")
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        registry.set_reward_actors([first, second])  # a replaced worker gets the current list
        assert model_names(second) == ["b"]
        register(stub, "a", a.address)  # a disabled name can be registered again
        assert not listed(stub)["a"].disabled and sorted(model_names(second)) == ["a", "b"]
        registry.disable("b", "dead")
        stub.RemoveRewardModel(control_pb2.RemoveRewardModelRequest(name="b"), timeout=30)
        assert sorted(listed(stub)) == ["a"] and model_names(first) == model_names(second) == ["a"]
    finally:
        ray.kill(first)
        ray.kill(second)


def test_reward_add_sends_its_token_file(tmp_path, servers, control, capsys):
    """``fleetrl reward add --reward-token-file FILE`` (in process): that token, and only it, reaches the
    server, and it is not printed back."""
    from learner.cli import main

    recording = RecordingRewardModel()
    foreign = servers(recording, host="127.0.0.2")
    _, _, address = control()
    token = tmp_path / "token"
    token.write_text("file-secret\n")
    assert main(["reward", "add", "foreign", "--endpoint", foreign.address, "--reward-token-file", str(token),
                 "--control", address]) == 0
    assert recording.auth == ["Bearer file-secret"] and "file-secret" not in capsys.readouterr().out
    token.write_text("\n")
    assert main(["reward", "add", "empty", "--endpoint", foreign.address, "--reward-token-file", str(token),
                 "--control", address]) == 2
    assert "is empty" in capsys.readouterr().err and recording.auth == ["Bearer file-secret"]
