"""The ``fleetrl`` commands that talk to a running trainer's Control service, or serve a model.

``reward add/remove/list``, ``env add/remove/list``, ``status`` and ``scale`` are
Control clients (``--control HOST:PORT``, ``$FLEETRL_CONTROL`` or ``--run-dir DIR``;
the token from ``--token-file`` or ``$FLEETRL_TOKEN``): they import neither torch nor
transformers and answer in a fraction of a second. ``reward serve`` and ``env
serve`` hand over to ``actors.reward.server`` and ``actors.envs.server``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path



class UsageError(ValueError):
    """A command line that is wrong: ``fleetrl CMD: error: ...``, exit 2."""


def _control_parser(prog: str):
    import argparse

    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("--control", help="HOST:PORT of the trainer's Control service ($FLEETRL_CONTROL)")
    p.add_argument("--run-dir", help="run directory of the trainer (reads control.json)")
    p.add_argument("--token-file", help="bearer token file (default: $FLEETRL_TOKEN)")
    p.add_argument("--tls-ca", help="PEM CA certificate when the Control service uses TLS")
    p.add_argument("--timeout", type=float, default=300.0, dest="rpc_timeout", help="RPC deadline in seconds")
    return p


def _control_stub(args):
    from actors.serving import channel, client_metadata, load_token
    from protos import control_pb2_grpc

    address = args.control or os.environ.get("FLEETRL_CONTROL")
    if not address and args.run_dir:
        path = Path(args.run_dir) / "control.json"
        if not path.is_file():
            raise UsageError(f"{path} not found: is the run serving Control (control.enabled)?")
        address = json.loads(path.read_text())["address"]
    if not address:
        raise UsageError("no Control address: pass --control HOST:PORT, --run-dir DIR or set FLEETRL_CONTROL")
    tls_ca = _read_file(args.tls_ca, "--tls-ca") if args.tls_ca else None
    return control_pb2_grpc.ControlStub(channel(address, tls_ca=tls_ca)), client_metadata(load_token(args.token_file))


def _read_file(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise UsageError(f"{flag} {path}: {e.strerror or e}") from None


def _read_token(path: str, flag: str) -> str:
    """A bearer token from ``path`` (read here, sent to the trainer, never echoed); an empty file
    is a usage error, not a registration without a token."""
    token = _read_file(path, flag).decode(errors="replace").strip()
    if not token:
        raise UsageError(f"{flag} {path} is empty")
    return token


def _registry_command(argv: list[str], noun: str):
    """``fleetrl NOUN {serve,add,remove,list}``: ``(sub, rest, prog, parser)``, the parser with
    the Control flags and, for add and remove, the registered name."""
    if not argv or argv[0] not in ("serve", "add", "remove", "list"):
        raise UsageError(f"usage: fleetrl {noun} {{serve,add,remove,list}} ...")
    sub, rest = argv[0], argv[1:]
    prog = f"fleetrl {noun} {sub}"
    p = _control_parser(prog)
    if sub in ("add", "remove"):
        p.add_argument("name")
    return sub, rest, prog, p


def _rpc(prog: str, fn):
    import grpc

    try:
        return fn()
    except grpc.RpcError as e:
        print(f"{prog}: error: {e.code().name}: {e.details()}", file=sys.stderr)
        raise SystemExit(1) from None


def cmd_reward(argv: list[str]) -> int:
    from google.protobuf.json_format import MessageToDict

    from protos import control_pb2

    sub, rest, prog, p = _registry_command(argv, "reward")
    if sub == "serve":
        from actors.reward.server import main_serve

        return main_serve(rest)
    if sub == "add":
        target = p.add_mutually_exclusive_group(required=True)
        target.add_argument("--endpoint", help="HOST:PORT of a fleetrl.reward.v1.RewardModel server")
        target.add_argument("--checkpoint", help="local HF sequence-classification folder (safetensors)")
        p.add_argument("--weight", type=float, default=1.0, help="weight in the combined reward")
        p.add_argument("--score-timeout", type=float, default=10.0, help="deadline of one Score call (s)")
        p.add_argument("--batch-size", type=int, default=64, help="samples per Score call")
        _add_client_flags(p)
    args = p.parse_args(rest)
    stub, md = _control_stub(args)
    if sub == "add":
        spec = control_pb2.RewardModelSpec(
            name=args.name, weight=args.weight, timeout_s=args.score_timeout, batch_size=args.batch_size,
            max_attempts=args.max_attempts, failure_threshold=args.failure_threshold, cooldown_s=args.cooldown,
            tls_ca_pem=_read_file(args.reward_tls_ca, "--reward-tls-ca") if args.reward_tls_ca else b"")
        if args.reward_token_file:
            spec.token = _read_token(args.reward_token_file, "--reward-token-file")
        if args.endpoint:
            spec.endpoint = args.endpoint
        else:
            spec.checkpoint_dir = str(Path(args.checkpoint).resolve())
        reply = _rpc(prog, lambda: stub.RegisterRewardModel(control_pb2.RegisterRewardModelRequest(spec=spec),
                                                            metadata=md, timeout=args.rpc_timeout))
        print(json.dumps(MessageToDict(reply.model, preserving_proto_field_name=True), indent=2))
    elif sub == "remove":
        _rpc(prog, lambda: stub.RemoveRewardModel(control_pb2.RemoveRewardModelRequest(name=args.name),
                                                  metadata=md, timeout=args.rpc_timeout))
        print(f"removed {args.name}")
    else:
        reply = _rpc(prog, lambda: stub.ListRewardModels(control_pb2.ListRewardModelsRequest(), metadata=md,
                                                         timeout=args.rpc_timeout))
        print(json.dumps([MessageToDict(m, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
                          for m in reply.models], indent=2))
    return 0


def _add_client_flags(p) -> None:
    """``reward add``: how the trainer calls the reward server (``--tls-ca`` is taken by the
    Control channel, hence ``--reward-tls-ca``)."""
    p.add_argument("--reward-tls-ca", metavar="FILE",
                   help="PEM CA certificate of the reward server's TLS (read here, sent to the trainer)")
    p.add_argument("--reward-token-file", metavar="FILE",
                   help="this reward server's bearer token (read here, sent to the trainer, never echoed); "
                        "without it the trainer's $FLEETRL_REWARD_TOKEN is used, only for endpoints in "
                        "control.allowed_reward_endpoints")
    p.add_argument("--max-attempts", type=int, default=3, help="tries per Score call (retries on UNAVAILABLE)")
    p.add_argument("--failure-threshold", type=int, default=3,
                   help="consecutive failed calls that mark the model unhealthy")
    p.add_argument("--cooldown", type=float, default=2.0, help="seconds an unhealthy model fails fast")


def cmd_env(argv: list[str]) -> int:
    from google.protobuf.json_format import MessageToDict

    from protos import control_pb2

    sub, rest, prog, p = _registry_command(argv, "env")
    if sub == "serve":
        from actors.envs.server import main_serve

        return main_serve(rest)
    if sub == "add":
        p.add_argument("--endpoint", required=True, help="HOST:PORT of a `fleetrl env serve` server")
        p.add_argument("--call-timeout", type=float, default=10.0, help="deadline of one Reset/Step/Close call (s)")
        p.add_argument("--max-attempts", type=int, default=3, help="tries per call (retries on UNAVAILABLE)")
        p.add_argument("--failure-threshold", type=int, default=3, help="unanswered calls that open the circuit")
        p.add_argument("--cooldown", type=float, default=5.0, help="seconds an open circuit fails fast")
        p.add_argument("--env-token-file", metavar="FILE", help="the server's bearer token (read here, never echoed)")
        p.add_argument("--env-tls-ca", metavar="FILE", help="PEM CA certificate of the server's TLS")
    args = p.parse_args(rest)
    stub, md = _control_stub(args)
    if sub == "add":
        spec = control_pb2.EnvironmentSpec(
            name=args.name, endpoint=args.endpoint, timeout_s=args.call_timeout, max_attempts=args.max_attempts,
            failure_threshold=args.failure_threshold, cooldown_s=args.cooldown,
            tls_ca_pem=_read_file(args.env_tls_ca, "--env-tls-ca") if args.env_tls_ca else b"")
        if args.env_token_file:
            spec.token = _read_token(args.env_token_file, "--env-token-file")
        reply = _rpc(prog, lambda: stub.RegisterEnvironment(control_pb2.RegisterEnvironmentRequest(spec=spec),
                                                            metadata=md, timeout=args.rpc_timeout))
        print(json.dumps(MessageToDict(reply.env, preserving_proto_field_name=True), indent=2))
    elif sub == "remove":
        _rpc(prog, lambda: stub.RemoveEnvironment(control_pb2.RemoveEnvironmentRequest(name=args.name), metadata=md,
                                                  timeout=args.rpc_timeout))
        print(f"removed {args.name}")
    else:
        reply = _rpc(prog, lambda: stub.ListEnvironments(control_pb2.ListEnvironmentsRequest(), metadata=md,
                                                         timeout=args.rpc_timeout))
        print(json.dumps([MessageToDict(e, preserving_proto_field_name=True) for e in reply.envs], indent=2))
    return 0


def cmd_status(argv: list[str]) -> int:
    from google.protobuf.json_format import MessageToDict

    from protos import control_pb2

    args = _control_parser("fleetrl status").parse_args(argv)
    stub, md = _control_stub(args)
    reply = _rpc("fleetrl status", lambda: stub.GetStatus(control_pb2.GetStatusRequest(), metadata=md,
                                                          timeout=args.rpc_timeout))
    print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True,
                                   always_print_fields_with_no_presence=True), indent=2))
    return 0


def cmd_scale(argv: list[str]) -> int:
    from protos import control_pb2

    p = _control_parser("fleetrl scale")
    p.add_argument("--rollout", type=int, required=True, help="number of rollout workers to run")
    args = p.parse_args(argv)
    stub, md = _control_stub(args)
    reply = _rpc("fleetrl scale", lambda: stub.ScaleRollout(control_pb2.ScaleRolloutRequest(num_workers=args.rollout),
                                                            metadata=md, timeout=args.rpc_timeout))
    print(f"rollout workers: {reply.previous} -> {reply.target}")
    return 0
