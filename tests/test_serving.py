"""What every fleetrl gRPC server gets from ``actors.serving.serve``: auth, TLS, arguments, bad bytes.

Real servers on 127.0.0.1 (port 0), real clients, real certificates; ``fleetrl reward
serve`` as a real process where its exit matters.
"""

from __future__ import annotations

import json
import logging
import secrets
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from actors.reward.server import CallableBackend, main_serve
from actors.serving import ServerConfig, serve
from tests.test_protos import _self_signed
from tests.test_reward_server import (PAIRS, ROOT, SERVICE_NAME, health_stub, length_reward, request, rpc_code,
                                      score_stub, serving, spec)


def test_bearer_scheme_is_case_insensitive(monkeypatch):
    token = secrets.token_hex(16)
    monkeypatch.setenv("FLEETRL_TOKEN", token)
    with serving(CallableBackend(spec(length_reward))) as (_, ch):
        stub, req = score_stub(ch), request(*PAIRS)

        def code(header: str) -> grpc.StatusCode:
            return rpc_code(stub.Score, req, timeout=10, metadata=(("authorization", header),))

        for scheme in ("Bearer", "bearer", "BEARER"):  # RFC 6750: the scheme is case-insensitive
            assert code(f"{scheme} {token}") == grpc.StatusCode.OK, scheme
        for header in (f"Basic {token}", f"Bearer {token.upper()}", f"Bearer{token}", token, "bearer "):
            assert code(header) == grpc.StatusCode.UNAUTHENTICATED, header


def test_an_unauthenticated_streaming_call_is_refused(monkeypatch):
    """The refusal has the method's own kind (reflection is a bidirectional stream)."""
    monkeypatch.setenv("FLEETRL_TOKEN", secrets.token_hex(16))
    with serving(CallableBackend(spec(length_reward))) as (_, ch):
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                            timeout=10)
        with pytest.raises(grpc.RpcError) as e:
            list(replies)
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, e.value.details()


def test_malformed_bytes_are_invalid_argument_in_every_service():
    """The standard health service too: the guard is in serve(), not in one servicer."""
    with serving(CallableBackend(spec(length_reward))) as (_, ch):
        raw = ch.unary_unary("/grpc.health.v1.Health/Check")
        with pytest.raises(grpc.RpcError) as e:
            raw(b"\xff\xff\xff", timeout=10)
        ok = health_stub(ch).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert ok.status == health_pb2.HealthCheckResponse.SERVING


def test_a_token_without_tls_off_loopback_warns_plaintext(monkeypatch, caplog, tmp_path):
    monkeypatch.setenv("FLEETRL_TOKEN", secrets.token_hex(16))
    cert, key = _self_signed(tmp_path)
    with caplog.at_level(logging.WARNING, logger="actors.serving"):
        for cfg in (dict(host="127.0.0.1"), dict(host="0.0.0.0", tls_cert=cert, tls_key=key)):
            with serving(CallableBackend(spec(length_reward)), **cfg):
                pass
        assert "plaintext" not in caplog.text  # loopback, or TLS: no warning
        with serving(CallableBackend(spec(length_reward)), host="0.0.0.0"):
            pass
    warned = [r.getMessage() for r in caplog.records if "plaintext" in r.getMessage()]
    assert len(warned) == 1 and "0.0.0.0" in warned[0], caplog.text


def _serve(**cfg):
    return serve(ServerConfig(**cfg), lambda server: None, [])


def _pair(folder):
    folder.mkdir()
    return _self_signed(folder)


def test_a_bad_tls_certificate_or_key_is_named(tmp_path):
    (cert, key), (other_cert, _) = _pair(tmp_path / "a"), _pair(tmp_path / "b")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    for bad_cert, bad_key in [(garbage, key), (cert, garbage), (other_cert, key)]:  # the last: not a pair
        with pytest.raises(ValueError) as e:
            _serve(tls_cert=str(bad_cert), tls_key=str(bad_key))
        msg = str(e.value)
        assert msg.startswith("invalid TLS certificate/key") and "cannot bind" not in msg and "\n" not in msg, msg
    with pytest.raises(ValueError, match="cannot read TLS key"):
        _serve(tls_cert=cert, tls_key=str(tmp_path / "missing.pem"))
    _serve(tls_cert=cert, tls_key=key).stop(grace_s=0)  # the good pair serves


def test_main_serve_bad_tls_is_one_line(tmp_path, capfd):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("garbage")
    argv = ["--function", spec(length_reward), "--tls-cert", str(garbage), "--tls-key", str(garbage)]
    assert main_serve(argv) == 2
    err = capfd.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("fleetrl reward serve: error: invalid TLS certificate/key"), err
    assert "cannot bind" not in err and "Handshaker" not in err


@pytest.mark.parametrize("port", [-1, 65536, 99999])
def test_serve_refuses_an_out_of_range_port(port):
    with pytest.raises(ValueError, match=f"port must be 1..65535, or 0 for a free port \\(got {port}\\)"):
        _serve(port=port)


BAD_ARGS = {"--port 99999": "argument --port: must be 1..65535, or 0 for a free port, got '99999'",
            "--port -1": "argument --port: must be 1..65535, or 0 for a free port, got '-1'",
            "--grace-s -5": "argument --grace-s: must be a number >= 0, got '-5'",
            "--max-request-samples 0": "argument --max-request-samples: must be an integer >= 1, got '0'",
            "--max-message-bytes 0": "argument --max-message-bytes: must be an integer >= 1, got '0'"}


def test_bad_numbers_are_usage_errors():
    """In a child process: before the fix these bound a port (or accepted the value) and served forever."""
    cases = [["--function", spec(length_reward), *arg.split()] for arg in BAD_ARGS]
    code = ("import json, sys; from actors.reward.server import main_serve\n"
            "for argv in json.loads(sys.argv[1]): print(main_serve(argv), flush=True)")
    try:
        done = subprocess.run([sys.executable, "-c", code, json.dumps(cases)], cwd=ROOT, capture_output=True,
                              text=True, timeout=60)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"fleetrl reward serve started serving with a bad argument: {e.stdout!r}")
    assert done.stdout.split() == ["2"] * len(cases), done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("fleetrl reward serve: error:")]
    assert errors == [f"fleetrl reward serve: error: {why}" for why in BAD_ARGS.values()], done.stderr
    assert "Traceback" not in done.stderr
