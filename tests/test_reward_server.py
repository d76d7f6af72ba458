"""The reward-model gRPC server: real servers on 127.0.0.1, real clients, no mocks.

Reward functions served in these tests live in this module and are loaded by
the server as ``tests.test_reward_server:<name>``, exactly as a user's would be.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from actors.reward.client import RemoteRewardClient
from actors.reward.hf import HFRewardModel, build_tiny_reward_model, check_checkpoint
from actors.reward.models import LocalRewardModel, RewardModelSpec
from actors.reward.scores import ScoreBatch
from actors.reward.server import (SERVICE_NAME, CallableBackend, HFBackend, MainThreadRunner, main_serve,
                                  start_reward_server)
from actors.serving import ServerConfig, channel, client_metadata
from actors.types import Excluded, Exclusion
from protos import reward_pb2, reward_pb2_grpc
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
GRPCURL = ROOT / ".venv" / "bin" / "grpcurl"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING

# ---- reward functions served by the tests ------------------------------------------------------

CALLS: list[dict] = []
ENTERED, RELEASE = threading.Event(), threading.Event()


def length_reward(prompts, completions, **metadata):
    """Score = completion length."""
    return [float(len(c)) for c in completions]


def recording_reward(prompts, completions, **metadata):
    """Records what it was called with; score = 1 if the completion equals metadata 'answer'."""
    CALLS.append(dict(prompts=prompts, completions=completions, metadata=metadata))
    return [float(c == a) for c, a in zip(completions, metadata.get("answer", [""] * len(completions)))]


def nan_reward(prompts, completions, **metadata):
    return [math.nan] * len(prompts)


def short_reward(prompts, completions, **metadata):
    return [1.0] * (len(prompts) - 1)


def raising_reward(prompts, completions, **metadata):
    raise ValueError("bug inside the reward function")


def blocking_reward(prompts, completions, **metadata):
    ENTERED.set()
    RELEASE.wait(30)
    return length_reward(prompts, completions)


class Gate:
    """The first call of ``gated_reward`` blocks until ``release``; every call's prompts are recorded."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.calls: list[list[str]] = []
        self.entered, self.release = threading.Event(), threading.Event()


GATE = Gate()


def gated_reward(prompts, completions, **metadata):
    GATE.calls.append(list(prompts))
    if len(GATE.calls) == 1:
        GATE.entered.set()
        GATE.release.wait(30)
    return [1.0] * len(prompts)


def file_gated_reward(prompts, completions, **metadata):
    """For a server in another process: touches GATE_DIR/entered, then waits for GATE_DIR/release."""
    gate = Path(os.environ["FLEETRL_TEST_GATE"])
    (gate / "entered").touch()
    while not (gate / "release").exists():
        time.sleep(0.01)
    return length_reward(prompts, completions)


# ---- helpers -----------------------------------------------------------------------------------

def spec(fn) -> str:
    return f"{__name__}:{fn.__name__}"


def request(*pairs, metadata=None) -> reward_pb2.ScoreRequest:
    metadata = metadata or [{}] * len(pairs)
    return reward_pb2.ScoreRequest(samples=[reward_pb2.Sample(prompt=p, completion=c, metadata=m)
                                            for (p, c), m in zip(pairs, metadata)])


@contextlib.contextmanager
def serving(backend, **cfg):
    """A running reward server and a client channel to it; stopped afterwards."""
    running = start_reward_server(backend, ServerConfig(**cfg))
    ch = channel(running.address)
    try:
        yield running, ch
    finally:
        ch.close()
        running.stop(grace_s=0)


def score_stub(ch):
    return reward_pb2_grpc.RewardModelStub(ch)


def health_stub(ch):
    return health_pb2_grpc.HealthStub(ch)


def rpc_code(call, *args, **kwargs) -> grpc.StatusCode:
    try:
        call(*args, **kwargs)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


PAIRS = [("12+3=", "15"), ("1=", "1"), ("7*6=", "forty-two")]


BATCH = ScoreBatch(prompts=["1=", "2="], completions=["1", "2"], metadata={}, prompt_ids=[[5], [7]],
                   completion_ids=[[5, 2], [8]])


def test_server_logs_the_request_id(caplog):
    import logging

    with caplog.at_level(logging.DEBUG, logger="actors.reward.server"):
        with serving(CallableBackend(spec(length_reward))) as (running, _):
            client = RemoteRewardClient(RewardModelSpec(name="rm", endpoint=running.address))
            client.score(BATCH)
            with serving(CallableBackend(spec(raising_reward))) as (broken, _):
                bad = RemoteRewardClient(RewardModelSpec(name="bad", endpoint=broken.address))
                (failed, _) = bad.score(BATCH)
                bad.close()
            client.close()
    ids = re.findall(r"score request ([0-9a-f]{32}): 2 samples", caplog.text)
    assert len(ids) == 2
    assert f"reward request {ids[1]} failed" in caplog.text and ids[1] in failed.detail
    assert isinstance(failed, Excluded) and failed.kind is Exclusion.REWARD_ERROR


# ---- callable backend --------------------------------------------------------------------------

def test_score_callable_in_order_with_metadata():
    CALLS.clear()
    meta = [{"answer": "15", "lang": "en"}, {}, {"answer": "42"}]
    with serving(CallableBackend(spec(recording_reward))) as (_, ch):
        resp = score_stub(ch).Score(request(*PAIRS, metadata=meta), timeout=10)
        md = score_stub(ch).GetMetadata(reward_pb2.GetMetadataRequest(), timeout=10)
    prompts, completions = [p for p, _ in PAIRS], [c for _, c in PAIRS]
    expected_meta = {k: [m.get(k, "") for m in meta] for k in ("answer", "lang")}
    assert CALLS == [dict(prompts=prompts, completions=completions, metadata=expected_meta)]
    assert list(resp.scores) == recording_reward(prompts, completions, **expected_meta)
    assert (md.name, md.kind) == ("recording_reward", CallableBackend.kind)


def test_score_length_reward_one_per_sample():
    with serving(CallableBackend(spec(length_reward))) as (_, ch):
        resp = score_stub(ch).Score(request(*PAIRS), timeout=10)
    assert list(resp.scores) == length_reward([p for p, _ in PAIRS], [c for _, c in PAIRS])


def test_auth_contract(monkeypatch):
    token = secrets.token_hex(16)
    monkeypatch.setenv("FLEETRL_TOKEN", token)
    with serving(CallableBackend(spec(length_reward))) as (running, ch):
        stub, req = score_stub(ch), request(*PAIRS)
        assert running.authenticated
        assert rpc_code(stub.Score, req, timeout=10) == grpc.StatusCode.UNAUTHENTICATED
        assert rpc_code(stub.Score, req, timeout=10,
                        metadata=client_metadata(token + "x")) == grpc.StatusCode.UNAUTHENTICATED
        assert rpc_code(stub.Score, req, timeout=10, metadata=client_metadata(token)) == grpc.StatusCode.OK
        health = health_stub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
        assert health.status == SERVING


def test_oversize_request_is_resource_exhausted():
    with serving(CallableBackend(spec(length_reward)), max_message_bytes=1024) as (_, ch):
        stub = score_stub(ch)
        assert rpc_code(stub.Score, request(("1=", "1")), timeout=10) == grpc.StatusCode.OK
        big = request(("1=", "x" * 10_000))
        assert rpc_code(stub.Score, big, timeout=10) == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("fn, code", [(length_reward, grpc.StatusCode.INVALID_ARGUMENT),  # empty request
                                      (nan_reward, grpc.StatusCode.INTERNAL),
                                      (short_reward, grpc.StatusCode.INTERNAL),
                                      (raising_reward, grpc.StatusCode.INTERNAL)])
def test_error_status_codes(fn, code):
    req = reward_pb2.ScoreRequest() if fn is length_reward else request(*PAIRS)
    with serving(CallableBackend(spec(fn))) as (_, ch):
        assert rpc_code(score_stub(ch).Score, req, timeout=10) == code


def test_graceful_shutdown():
    """Health goes NOT_SERVING while a call is in flight; that call finishes; later calls fail."""
    ENTERED.clear()
    RELEASE.clear()
    running = start_reward_server(CallableBackend(spec(blocking_reward)), ServerConfig())
    ch = channel(running.address)
    result: dict = {}

    def call():
        try:
            result["resp"] = score_stub(ch).Score(request(*PAIRS), timeout=30)
        except grpc.RpcError as e:
            result["error"] = e.code()

    try:
        # Check cannot see NOT_SERVING (stop() closes the listener at once), so watch the status stream
        watch = health_stub(ch).Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=20)
        assert next(watch).status == SERVING
        caller = threading.Thread(target=call)
        caller.start()
        assert ENTERED.wait(10), "Score never reached the reward function"
        stopper = threading.Thread(target=running.stop, kwargs=dict(grace_s=5))
        stopper.start()
        assert next(watch).status == NOT_SERVING  # bounded by the Watch deadline
        assert caller.is_alive() and not result, "in-flight call ended before the status flipped"
        watch.cancel()
    finally:
        RELEASE.set()
    caller.join(10)
    stopper.join(10)
    assert not stopper.is_alive()
    assert list(result["resp"].scores) == length_reward([p for p, _ in PAIRS], [c for _, c in PAIRS])
    assert rpc_code(score_stub(ch).Score, request(*PAIRS), timeout=10) == grpc.StatusCode.UNAVAILABLE
    ch.close()


# ---- grpcurl -----------------------------------------------------------------------------------

def grpcurl(*args) -> subprocess.CompletedProcess:
    if not GRPCURL.exists() and not shutil.which("grpcurl"):
        pytest.skip("grpcurl binary not installed")
    exe = str(GRPCURL) if GRPCURL.exists() else shutil.which("grpcurl")
    return subprocess.run([exe, "-plaintext", *args], capture_output=True, text=True, timeout=30)


def test_grpcurl_list_and_score():
    with serving(CallableBackend(spec(length_reward))) as (running, _):
        listed = grpcurl(running.address, "list")
        scored = grpcurl("-d", '{"samples":[{"prompt":"1=","completion":"1"}]}', running.address,
                         f"{SERVICE_NAME}/Score")
    assert listed.returncode == 0, listed.stderr
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= set(listed.stdout.split())
    assert scored.returncode == 0, scored.stderr
    assert json.loads(scored.stdout)["scores"] == length_reward(["1="], ["1"])


# ---- Hugging Face backend ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_reward(tmp_path_factory) -> Path:
    return build_tiny_reward_model(tmp_path_factory.mktemp("tiny-reward"), seed=0)


def copy_model(src: Path, dst: Path, *, skip: str = "") -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(skip) if skip else None)
    return dst


def test_hf_backend_matches_in_process(tiny_reward):
    pairs = PAIRS + [("", "0123456789 " * 3)]
    prompts, completions = [p for p, _ in pairs], [c for _, c in pairs]
    with serving(HFBackend(tiny_reward, batch_size=2)) as (_, ch):
        served = list(score_stub(ch).Score(request(*pairs), timeout=30).scores)
        md = score_stub(ch).GetMetadata(reward_pb2.GetMetadataRequest(), timeout=10)
    local = HFRewardModel(tiny_reward, batch_size=3)
    alone = [local.score([p], [c])[0] for p, c in pairs]
    assert len(served) == len(pairs) and all(math.isfinite(s) for s in served)
    assert served == pytest.approx(local.score(prompts, completions), abs=1e-5)
    assert served == pytest.approx(alone, abs=1e-5)  # padding does not change a sample's score
    assert len(set(served)) > 1
    assert (md.kind, md.max_batch_size, md.name) == (HFRewardModel.kind, 2, tiny_reward.name)
    # a local checkpoint registered at run time scores through the same wrapper
    local_model = LocalRewardModel(RewardModelSpec(name="rm", checkpoint_dir=str(tiny_reward), batch_size=2))
    assert local_model.score(ScoreBatch(prompts=prompts, completions=completions, metadata={})) \
        == pytest.approx(served, abs=1e-5)


@pytest.mark.parametrize("breakage, reason", [("pickle", "pickle"), ("no-safetensors", "no *.safetensors"),
                                              ("auto_map", "remote code"), ("missing", "no such directory")])
def test_check_checkpoint_refuses(tiny_reward, tmp_path, capsys, breakage, reason):
    bad = tmp_path / "bad"
    if breakage == "pickle":
        (copy_model(tiny_reward, bad) / "pytorch_model.bin").write_bytes(b"not even loaded")
    elif breakage == "no-safetensors":
        copy_model(tiny_reward, bad, skip="*.safetensors")
    elif breakage == "auto_map":
        config = json.loads((copy_model(tiny_reward, bad) / "config.json").read_text())
        config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_evil.EvilModel"}
        (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(reason)):
        check_checkpoint(bad)
    assert main_serve(["--model", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "fleetrl reward serve: error:" in err and reason in err


def test_hf_refuses_multi_label_model(tiny_policy):
    with pytest.raises(ValueError, match="exactly 1"):
        HFRewardModel(tiny_policy)


@pytest.mark.parametrize("argv", [[], ["--model", "m", "--function", f"{__name__}:length_reward"],
                                  ["--function", "no_such_module:fn"]])
def test_main_serve_bad_arguments(argv, capsys):
    assert main_serve(argv) == 2
    assert "fleetrl reward serve: error:" in capsys.readouterr().err


# ---- the command as a real process -------------------------------------------------------------

def test_main_serve_subprocess_sigterm():
    code = "import sys; from actors.reward.server import main_serve; sys.exit(main_serve(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "--function", spec(length_reward), "--port", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        try:
            line = lines.get(timeout=45)
        except queue.Empty:
            pytest.fail("the server printed no address line within 45 s")
        m = re.fullmatch(r"fleetrl reward server length_reward listening on (\S+):(\d+)\n", line)
        assert m, line
        with channel(f"{m[1]}:{m[2]}") as ch:
            resp = score_stub(ch).Score(request(*PAIRS), timeout=10)
        assert list(resp.scores) == length_reward([p for p, _ in PAIRS], [c for _, c in PAIRS])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def serve_process(*args, env=None):
    """``fleetrl reward serve ARGS`` as a real process: (process, address)."""
    code = "import sys; from actors.reward.server import main_serve; sys.exit(main_serve(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        line = lines.get(timeout=45)
    except queue.Empty:
        proc.kill()
        pytest.fail(f"the server printed no address line within 45 s: {proc.stderr.read()}")
    m = re.fullmatch(r"fleetrl reward server \S+ listening on (\S+:\d+)\n", line)
    assert m, line
    return proc, m[1]


def test_sigint_flips_health_before_the_batch_being_scored_ends(tmp_path):
    """Health is NOT_SERVING right at the signal, while the main thread is still scoring; that call then
    finishes (graceful drain) and the process exits 0."""
    proc, address = serve_process("--function", spec(file_gated_reward), env={"FLEETRL_TEST_GATE": str(tmp_path)})
    try:
        with channel(address) as ch:
            call = score_stub(ch).Score.future(request(*PAIRS), timeout=30)
            wait_for(lambda: (tmp_path / "entered").exists(), 20, what="the reward function to be entered")
            watch = health_stub(ch).Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=15)
            assert next(watch).status == SERVING
            proc.send_signal(signal.SIGINT)
            assert next(watch).status == NOT_SERVING  # DEADLINE_EXCEEDED if it waits for the batch
            assert not call.done(), "the in-flight call ended before health flipped"
            (tmp_path / "release").touch()
            assert list(call.result(timeout=20).scores) == length_reward([p for p, _ in PAIRS], [c for _, c in PAIRS])
            watch.cancel()
        assert proc.wait(timeout=20) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- limits: sample cap, abandoned requests, malformed bytes ------------------------------------

def test_a_request_over_the_sample_cap_is_resource_exhausted():
    with serving(CallableBackend(spec(length_reward))) as (running, ch):  # the default cap: 4096
        stub = score_stub(ch)
        assert rpc_code(stub.Score, request(*[("1=", "1")] * 4096), timeout=30) == grpc.StatusCode.OK
        with pytest.raises(grpc.RpcError) as e:
            stub.Score(request(*[("1=", "1")] * 4097), timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "4097 samples" in e.value.details() and "--max-request-samples 4096" in e.value.details()


@contextlib.contextmanager
def serving_direct(backend, max_request_samples=100_000):
    """A reward server whose backend runs on the gRPC handler threads."""
    running = start_reward_server(backend, ServerConfig(), max_request_samples=max_request_samples)
    ch = channel(running.address)
    try:
        yield ch
    finally:
        GATE.release.set()
        ch.close()
        running.stop(grace_s=0)


@contextlib.contextmanager
def serving_on_runner(backend, max_request_samples=100_000):
    """A reward server whose backend runs on a MainThreadRunner (as in ``fleetrl reward serve``)."""
    runner, stop = MainThreadRunner(backend), threading.Event()
    loop = threading.Thread(target=runner.run, args=(stop.is_set,), daemon=True)
    loop.start()
    try:
        with serving_direct(runner, max_request_samples) as ch:
            yield ch
    finally:
        stop.set()
        loop.join(10)


def expire(future, sent_at: float, timeout_s: float) -> None:
    """The call fails DEADLINE_EXCEEDED; then wait until the server's copy of the deadline has passed too."""
    with pytest.raises(grpc.RpcError) as e:
        future.result(timeout=20)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_for(lambda: time.monotonic() > sent_at + timeout_s + 0.1, 5, what="the server-side deadline")


@pytest.mark.parametrize("serve_on", [serving_on_runner, serving_direct], ids=["runner", "direct"])
def test_an_expired_request_stops_between_batches(serve_on):
    """10 batches of 100 samples; the client gives up during the first: the other 9 are never scored,
    and the next call is served at once."""
    GATE.reset()
    with serve_on(CallableBackend(spec(gated_reward), max_batch_size=100)) as ch:
        stub, sent_at = score_stub(ch), time.monotonic()
        big = stub.Score.future(request(*[(f"big-{i}", "x") for i in range(1000)]), timeout=0.5)
        assert GATE.entered.wait(10)
        expire(big, sent_at, 0.5)
        GATE.release.set()
        assert list(stub.Score(request(("small", "x")), timeout=10).scores) == [1.0]
    scored_big = sum(len(c) for c in GATE.calls if c[0].startswith("big-"))
    assert scored_big == 100, f"{scored_big} samples of the abandoned request were scored ({len(GATE.calls)} calls)"


def test_an_expired_queued_request_is_never_scored():
    GATE.reset()
    with serving_on_runner(CallableBackend(spec(gated_reward))) as ch:
        stub = score_stub(ch)
        first = stub.Score.future(request(("first", "x")), timeout=30)
        assert GATE.entered.wait(10)
        sent_at = time.monotonic()
        queued = stub.Score.future(request(*[(f"queued-{i}", "x") for i in range(50)]), timeout=0.3)
        expire(queued, sent_at, 0.3)
        GATE.release.set()
        assert list(first.result(timeout=10).scores) == [1.0]
        assert list(stub.Score(request(("last", "x")), timeout=10).scores) == [1.0]
    assert [c for c in GATE.calls if any(p.startswith("queued-") for p in c)] == []
    assert [c[0] for c in GATE.calls] == ["first", "last"]


def test_malformed_request_bytes_are_invalid_argument():
    with serving(CallableBackend(spec(length_reward))) as (_, ch):
        raw = ch.unary_unary(f"/{SERVICE_NAME}/Score")  # no serializer: the bytes go out as they are
        with pytest.raises(grpc.RpcError) as e:
            raw(b"\xff\xff\xff\xff", timeout=10)
        assert rpc_code(score_stub(ch).Score, request(*PAIRS), timeout=10) == grpc.StatusCode.OK
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert f"malformed request to /{SERVICE_NAME}/Score" in e.value.details()


def test_a_corrupt_safetensors_file_is_a_one_line_error(tiny_reward, tmp_path, capfd):
    bad = copy_model(tiny_reward, tmp_path / "corrupt")
    (bad / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}" + b"\0" * 64)
    assert main_serve(["--model", str(bad)]) == 2
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("fleetrl reward serve: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert str(bad) in errors[0] or "safetensors" in errors[0].lower(), errors[0]


def test_a_call_the_stopped_runner_will_not_score_is_unavailable():
    """After shutdown (the runner closed) a late call fails UNAVAILABLE, the code clients retry on."""
    runner = MainThreadRunner(CallableBackend(spec(length_reward)))
    runner.close(RuntimeError("unused: nothing queued"))
    with serving(runner) as (_, ch):
        with pytest.raises(grpc.RpcError) as e:
            score_stub(ch).Score(request(*PAIRS), timeout=10)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "shut down" in e.value.details()
