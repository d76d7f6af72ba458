"""Environments over gRPC: ``fleetrl env serve`` and ``RemoteEnvironment``.

Real servers on 127.0.0.1 with a free port (a ``fleetrl env serve`` subprocess where
the test kills or signals it, in-process otherwise), real rollout workers, stock
``grpcurl``. Every way a remote environment can fail ends its episode as an
excluded sample with a reason, within the client's deadline, and the worker goes on.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from actors.envs.base import EnvError
from actors.envs.config import EnvConfig, make_env
from actors.envs.remote import RemoteEnvironment, RemoteEnvSpec
from actors.envs.server import SERVICE_NAME, start_env_server
from actors.rollout.worker import RolloutConfig, RolloutWorker
from actors.serving import ServerConfig
from actors.types import Exclusion, Prompt
from protos import env_pb2, env_pb2_grpc
from tests.envs import Crashes, Echo, Garbage, Hangs
from tests.conftest import wait_for
from tests.test_envs import build_chat_char_policy, chat_prompt

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def served(env, **kw):
    server = start_env_server(env, ServerConfig(port=0), name=type(env).__name__, **kw)
    try:
        yield server
    finally:
        server.stop(0, lame_duck_s=0)


def remote(address: str, **kw) -> RemoteEnvironment:
    return make_env(f"grpc://{address}", kw)


@pytest.fixture(scope="module")
def chat_policy(tmp_path_factory) -> str:
    return build_chat_char_policy(tmp_path_factory.mktemp("chat-char-policy"))


def test_a_remote_episode_is_the_in_process_one():
    local = Echo(turns=3)
    with served(Echo(turns=3)) as server:
        env = remote(server.address)
        state, mine = env.reset("p", {"answer": 12}), local.reset("p", {"answer": 12})
        for text in ("one", "two two", "three"):
            a, b = env.step(state, text), local.step(mine, text)
            assert (a.observation, a.done, a.info) == (b.observation, b.done, {k: float(v) for k, v in b.info.items()})
        assert env.finish(state) == local.finish(mine) == {"echo_turns": 3, "echo_chars": 15}
        with pytest.raises(EnvError, match="NOT_FOUND"):  # closed: the id is gone
            env.step(state, "more")


def test_fleetrl_env_serve_with_stock_grpcurl():
    proc = subprocess.Popen([sys.executable, "-m", "learner.cli", "env", "serve", "calculator", "--port", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert "listening on" in line, line
        address = line.split()[-1]
        exe = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
        grpcurl = lambda *a: subprocess.run([exe, "-plaintext", *a], capture_output=True, text=True, timeout=30)  # noqa: E731
        listed = grpcurl(address, "list")
        assert listed.returncode == 0 and {SERVICE_NAME, "grpc.health.v1.Health"} <= set(listed.stdout.split())
        health = grpcurl(address, "grpc.health.v1.Health/Check")
        assert json.loads(health.stdout)["status"] == "SERVING"
        opened = json.loads(grpcurl("-d", '{"prompt": "What is 6 * 7?"}', address, f"{SERVICE_NAME}/Reset").stdout)
        stepped = json.loads(grpcurl("-d", json.dumps({"episode_id": opened["episode_id"],
                                                        "completion": "<calculator>6 * 7</calculator>"}),
                                     address, f"{SERVICE_NAME}/Step").stdout)
        assert stepped["observation"] == [{"role": "tool", "content": "<result>42</result>"}]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        proc.kill()
    bad = subprocess.run([sys.executable, "-m", "learner.cli", "env", "serve", "tests.envs:Nope"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("fleetrl env serve: error: env.name: cannot load")
    assert len(bad.stderr.strip().splitlines()) == 1


def test_a_rollout_worker_runs_remote_episodes_like_local_ones(chat_policy):
    """Greedy episodes through a served Echo give the ids, masks and metadata of the in-process Echo."""
    cfg = RolloutConfig(group_size=2, max_new_tokens=6, temperature=0.0)
    local = RolloutWorker(chat_policy, cfg, env=EnvConfig(name="tests.envs:Echo", args={"turns": 3}, max_turns=3))
    prompt = chat_prompt(local.tokenizer, "Hi")
    (want,) = local.generate([prompt])
    with served(Echo(turns=3)) as server:
        w = RolloutWorker(chat_policy, cfg, env=EnvConfig(name=f"grpc://{server.address}", max_turns=3))
        (got,) = w.generate([prompt])
    for a, b in zip(got.samples, want.samples):
        assert (a.completion_ids, a.loss_mask, a.turns) == (b.completion_ids, b.loss_mask, b.turns)
        assert a.metadata["echo_turns"] == b.metadata["echo_turns"] == 3
        assert a.excluded is None


@pytest.mark.parametrize("env, kind, detail", [
    (Crashes(), Exclusion.ENV_ERROR, "INTERNAL: RuntimeError: the environment crashed"),
    (Garbage(), Exclusion.ENV_ERROR, "INTERNAL: step returned str, not a StepResult"),
    (Hangs(), Exclusion.ENV_TIMEOUT, "DEADLINE_EXCEEDED"),
], ids=["crashes", "garbage", "hangs"])
def test_a_failing_server_excludes_the_episode_within_its_deadline(chat_policy, env, kind, detail):
    cfg = RolloutConfig(group_size=2, max_new_tokens=4)
    prompts = [Prompt(uid=0, text="x", metadata={"answer": "24"}), Prompt(uid=1, text="y", metadata={"answer": "12"})]
    with served(env) as server:
        w = RolloutWorker(chat_policy, cfg, env=EnvConfig(name=f"grpc://{server.address}", args={"timeout_s": 1.5},
                                                          max_turns=3))
        t0 = time.monotonic()
        ok, failed = w.generate(prompts)  # Crashes and Hangs fail the odd answer "12" only
        took = time.monotonic() - t0
    reasons = {s.excluded.kind for s in ok.samples + failed.samples if s.excluded}
    assert reasons == {kind}, reasons
    assert all(s.excluded and detail in s.excluded.detail for s in failed.samples), \
        [s.excluded for s in failed.samples]
    if not isinstance(env, Garbage):
        assert all(s.excluded is None for s in ok.samples)
    assert took < 15, took


def test_a_killed_server_opens_the_circuit_and_calls_fail_fast(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "learner.cli", "env", "serve", "tests.envs:Echo", "--port", "0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        address = proc.stdout.readline().split()[-1]
        env = remote(address, timeout_s=2.0, failure_threshold=2, cooldown_s=60.0)
        state = env.reset("p", {})
        assert env.step(state, "a").observation
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    for _ in range(2):  # UNAVAILABLE after the retries: each call fails, and two open the circuit
        with pytest.raises(EnvError, match="UNAVAILABLE"):
            env.step(state, "b")
    t0 = time.monotonic()
    with pytest.raises(EnvError, match="unhealthy"):
        env.reset("p", {})
    assert time.monotonic() - t0 < 0.1  # failed fast: no call was made


def test_auth_unknown_episodes_and_the_episode_cap(monkeypatch):
    monkeypatch.setenv("FLEETRL_TOKEN", "env-secret")
    with served(Echo(), max_episodes=2) as server:
        monkeypatch.delenv("FLEETRL_TOKEN")
        assert server.authenticated
        with pytest.raises(EnvError, match="UNAUTHENTICATED"):
            RemoteEnvironment(RemoteEnvSpec(endpoint=server.address))
        monkeypatch.setenv("FLEETRL_ENV_TOKEN", "env-secret")
        env = remote(server.address)
        env.reset("a", {}), env.reset("b", {})
        with pytest.raises(EnvError, match="RESOURCE_EXHAUSTED"):
            env.reset("c", {})
        stub = env_pb2_grpc.EnvironmentStub(grpc.insecure_channel(server.address))
        with pytest.raises(grpc.RpcError) as e:
            stub.Step(env_pb2.StepRequest(episode_id="nope"), metadata=env.metadata, timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_an_unreachable_server_excludes_samples_and_the_worker_goes_on(chat_policy):
    cfg = RolloutConfig(group_size=2, max_new_tokens=4)
    w = RolloutWorker(chat_policy, cfg, env=EnvConfig(name="grpc://127.0.0.1:9", args={"timeout_s": 1.0,
                                                                                      "max_attempts": 1}))
    (group,) = w.generate([Prompt(uid=0, text="x", metadata={})])
    assert all(s.excluded and s.excluded.kind == Exclusion.ENV_ERROR and "UNAVAILABLE" in s.excluded.detail
               for s in group.samples)
    assert w.broken is None
    with served(Echo(turns=2)) as server:  # the same worker, a reachable server: episodes again
        w.env_cfg = EnvConfig(name=f"grpc://{server.address}", max_turns=2)
        (group,) = w.generate([Prompt(uid=1, text="x", metadata={})])
    assert all(s.excluded is None and s.turns == 2 for s in group.samples)


def _cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "learner.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_environments_registered_and_removed_while_training_runs(ray_session, chat_policy, tmp_path):
    """Rows name their environment (env.key): "calc" is registered over Control mid-run
    (`fleetrl env add`), served by a `fleetrl env serve` subprocess, then removed; "missing" never
    is; rows with none are single turns (and keep the run stepping). Rows naming an environment
    that is not registered are excluded (env_unknown); once "calc" is registered its rows become
    2-turn episodes; accounting stays exact."""
    from learner.config import load_config
    from learner.driver.trainer import Trainer

    rows = [{"prompt": f"q{i}", "answer": str(10 + i), "env": ["", "calc", "missing"][i % 3]} for i in range(96)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, [
        "--model.path", chat_policy, "--data.train_files", f"[{data}]", "--data.answer_key", "answer",
        "--data.eval_fraction", "0", "--env.key", "env", "--env.max_turns", "2",
        "--reward.functions", "['tests.rewards:brevity']", "--train.steps", "100000", "--train.max_wall_s", "300",
        "--train.prompts_per_step", "4", "--rollout.group_size", "2", "--rollout.prompts_per_request", "2",
        "--rollout.max_new_tokens", "6", "--rollout.num_workers", "1", "--learner.num_threads", "1",
        "--watch.plot", "false", "--watch.report_to", "[jsonl]", "--train.eval_every", "0"])
    trainer = Trainer(cfg, tmp_path / "run", out=io.StringIO(), progress=False)
    result = {}
    def target():
        try:
            result["summary"] = trainer.train()
        except BaseException as e:  # noqa: BLE001 - surfaced below
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    server = subprocess.Popen([sys.executable, "-m", "learner.cli", "env", "serve", "tests.envs:Echo", "--args",
                               '{"turns": 2}', "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        address = server.stdout.readline().split()[-1]
        wait_for(lambda: trainer.step >= 2 and trainer.control is not None or "error" in result, 120, what="two steps")
        assert "error" not in result, result["error"]
        control = trainer.control.address
        assert trainer.counters["dropped_by_reason"].get("env_unknown", 0) > 0
        bad = _cli("env", "add", "calc", "--endpoint", "unix:/tmp/x", "--control", control)
        assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr
        gone = _cli("env", "add", "calc", "--endpoint", "127.0.0.1:9", "--call-timeout", "1", "--control", control)
        assert gone.returncode == 1 and "FAILED_PRECONDITION" in gone.stderr
        added = _cli("env", "add", "calc", "--endpoint", address, "--control", control)
        assert added.returncode == 0, added.stderr
        assert json.loads(_cli("env", "list", "--control", control).stdout)[0]["spec"]["name"] == "calc"
        step = trainer.step
        wait_for(lambda: any(r.get("tool_calls", 0) > 0 for r in trainer.history if r["step"] > step), 120,
                 what="episodes on the registered environment")
        assert _cli("env", "remove", "calc", "--control", control).returncode == 0
        assert json.loads(_cli("env", "list", "--control", control).stdout) == []
    finally:
        trainer.stop_requested.set()
        thread.join(120)
        trainer.shutdown()
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    s = result["summary"]
    assert s["produced"] == s["trained"] + s["dropped"] and s["trained"] > 0
    episodes = [r for r in trainer.history if r.get("turns_mean", 0) > 1]
    assert episodes and all(r["observation_tokens"] > 0 for r in episodes)


def test_a_registered_environment_gets_its_own_token_never_the_runs(monkeypatch):
    """The run's $FLEETRL_ENV_TOKEN goes to env.name's server only: a server a Control client
    registers gets the token the client brings, or none; the run's own names cannot be taken."""
    from learner.control.envs import EnvRegistry, spec_of
    from learner.control.rules import ControlError

    pushed = []
    registry = EnvRegistry(pushed.append, reserved=("tests.envs:Echo",))
    monkeypatch.setenv("FLEETRL_TOKEN", "server-secret")
    with served(Echo()) as server:
        monkeypatch.delenv("FLEETRL_TOKEN")
        monkeypatch.setenv("FLEETRL_ENV_TOKEN", "server-secret")  # the run's: it would open the server
        with pytest.raises(ControlError) as e:
            registry.register("echo", spec_of(server.address))
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "UNAUTHENTICATED" in str(e.value)
        info = registry.register("echo", spec_of(server.address, token="server-secret"))
        assert info["spec"].token is None and "server-secret" not in repr(registry.current()["echo"])
        assert list(pushed[-1]) == ["echo"] and pushed[-1]["echo"].token == "server-secret"
        for name in ("calculator", "python", "tests.envs:Echo"):
            with pytest.raises(ControlError) as e:
                registry.register(name, spec_of(server.address, token="server-secret"))
            assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        registry.remove("echo")
        assert pushed[-1] == {}


def test_retried_calls_are_answered_once():
    """The client retries UNAVAILABLE with the same request_id: the store answers a repeated Reset
    with the same episode and a repeated Step with the same result, advancing the episode once."""
    from actors.envs.server import EpisodeStore

    store = EpisodeStore(Echo(turns=3))
    eid = store.reset("p", {}, "r1")
    assert store.reset("p", {}, "r1") == eid and len(store.open) == 1
    first = store.step(eid, "abc", "s1")
    assert store.step(eid, "abc", "s1") is first
    assert store.open[eid].state["turn"] == 1
    store.step(eid, "abcd", "s2")
    assert store.open[eid].state["turn"] == 2
