"""The Control service a running ``fleetrl train`` hosts (``fleetrl.control.v1``).

The logic is in ``RewardRegistry`` (plain class, driver side); the servicer
only translates protobuf <-> Python and ``ControlError`` -> status codes.

Registering a reward model starts a ``RewardModelActor`` for it and hands the
new model list to every reward worker; the next batch they score includes it
in the weighted sum. Removing does the reverse.
"""

from __future__ import annotations

import logging
import math
import os
import threading

import grpc
import ray

from actors.runtime.actors import create_reward_model_actor
from actors.reward.client import RemoteRewardSpec
from protos import control_pb2, control_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "fleetrl.control.v1.Control"
MAX_WEIGHT = 1e6
MAX_TIMEOUT_S = 600.0
PUSH_TIMEOUT_S = 60.0


class ControlError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def _endpoint_ok(endpoint: str) -> bool:
    host, sep, port = endpoint.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def validate_spec(spec: RemoteRewardSpec) -> RemoteRewardSpec:
    """Check a spec before anything starts; raises ControlError(INVALID_ARGUMENT)."""
    bad = grpc.StatusCode.INVALID_ARGUMENT
    if not spec.name or len(spec.name) > 128 or any(c.isspace() for c in spec.name):
        raise ControlError(bad, f"name {spec.name!r}: 1-128 characters without spaces")
    if bool(spec.endpoint) == bool(spec.checkpoint_dir):
        raise ControlError(bad, "give exactly one target: endpoint (host:port) or checkpoint_dir")
    if spec.endpoint and not _endpoint_ok(spec.endpoint):
        raise ControlError(bad, f"endpoint {spec.endpoint!r} is not host:port")
    if spec.checkpoint_dir:
        from actors.reward.hf import check_checkpoint

        try:
            check_checkpoint(spec.checkpoint_dir)
        except ValueError as e:
            raise ControlError(bad, str(e)) from None
    if not (math.isfinite(spec.weight) and abs(spec.weight) <= MAX_WEIGHT):
        raise ControlError(bad, f"weight {spec.weight} must be finite and within +-{MAX_WEIGHT:g}")
    if not (math.isfinite(spec.timeout_s) and 0 < spec.timeout_s <= MAX_TIMEOUT_S):
        raise ControlError(bad, f"timeout_s {spec.timeout_s} must be in (0, {MAX_TIMEOUT_S:g}]")
    if spec.batch_size < 1:
        raise ControlError(bad, f"batch_size {spec.batch_size} must be >= 1")
    return spec


class RewardRegistry:
    """Run-time reward models of one training run (thread-safe: gRPC calls arrive on threads)."""

    def __init__(self, reward_actors: list, reserved_names: list[str]):
        self.reward_actors = reward_actors
        self.reserved = set(reserved_names)
        self.models: dict[str, tuple[RemoteRewardSpec, object]] = {}
        self.lock = threading.Lock()

    def _push(self) -> None:
        """Hand the model list to every reward worker (they apply it at their next batch)."""
        models = [(name, spec.weight, handle, spec.timeout_s * spec.max_attempts, spec.batch_size)
                  for name, (spec, handle) in self.models.items()]
        ray.get([a.set_models.remote(models) for a in self.reward_actors], timeout=PUSH_TIMEOUT_S)

    def register(self, spec: RemoteRewardSpec) -> dict:
        validate_spec(spec)
        with self.lock:
            if spec.name in self.models or spec.name in self.reserved:
                raise ControlError(grpc.StatusCode.ALREADY_EXISTS, f"reward model {spec.name!r} already exists")
            handle = create_reward_model_actor(spec)
            try:  # the server answers GetMetadata with our token / the checkpoint loads
                ray.get(handle.probe.remote(), timeout=spec.timeout_s + 120)
            except ray.exceptions.RayTaskError as e:
                ray.kill(handle)
                cause = e.as_instanceof_cause()
                detail = f"{cause.code().name}: {cause.details()}" if isinstance(cause, grpc.RpcError) else str(cause)
                raise ControlError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"reward model {spec.name!r} is not usable: {detail}") from None
            except Exception as e:  # noqa: BLE001 - actor died, timed out
                ray.kill(handle)
                raise ControlError(grpc.StatusCode.UNAVAILABLE, f"cannot start {spec.name!r}: {e}") from None
            self.models[spec.name] = (spec, handle)
            try:
                self._push()
            except Exception as e:  # noqa: BLE001 - roll back: the model is not registered
                self.models.pop(spec.name)
                ray.kill(handle)
                raise ControlError(grpc.StatusCode.UNAVAILABLE, f"reward workers did not take {spec.name!r}: {e}") \
                    from None
        log.info("reward model %s registered (%s, weight %s)", spec.name, spec.endpoint or spec.checkpoint_dir,
                 spec.weight)
        return self.info(spec.name)

    def remove(self, name: str) -> None:
        with self.lock:
            if name not in self.models:
                raise ControlError(grpc.StatusCode.NOT_FOUND, f"no reward model named {name!r}")
            _, handle = self.models.pop(name)
            ray.kill(handle)  # first: a reward worker waiting on it is released now
            try:
                self._push()
            except Exception as e:  # noqa: BLE001 - its calls already fail fast; report the push failure
                raise ControlError(grpc.StatusCode.UNAVAILABLE, f"{name!r} removed, but reward workers did "
                                   f"not confirm: {e}") from None
        log.info("reward model %s removed", name)

    def info(self, name: str) -> dict:
        try:
            spec, handle = self.models[name]
        except KeyError:
            raise ControlError(grpc.StatusCode.NOT_FOUND, f"no reward model named {name!r}") from None
        try:
            stats = ray.get(handle.info.remote(), timeout=10)
        except Exception as e:  # noqa: BLE001
            stats = {"healthy": False, "scored": 0, "failed": 0, "reward_mean": 0.0, "last_error": str(e)}
        return {"spec": spec, **stats}

    def list(self) -> list[dict]:
        with self.lock:
            names = list(self.models)
        out = []
        for n in names:
            try:
                out.append(self.info(n))
            except ControlError:  # removed meanwhile
                pass
        return out

    def close(self) -> None:
        with self.lock:
            for _, handle in self.models.values():
                ray.kill(handle)
            self.models.clear()


# -- protobuf translation ------------------------------------------------------------------------
def spec_from_proto(p: control_pb2.RewardModelSpec, token_file: str | None = None) -> RemoteRewardSpec:
    """The token for calling reward servers is the driver's $FLEETRL_REWARD_TOKEN_FILE or
    $FLEETRL_REWARD_TOKEN (never the Control token: a reward server must not be able to
    control the run), resolved here so reward-model actors on other nodes have it too."""
    from actors.serving import load_token

    try:
        token = load_token(token_file, env="FLEETRL_REWARD_TOKEN")
    except (OSError, ValueError) as e:
        raise ControlError(grpc.StatusCode.FAILED_PRECONDITION, f"reward token file: {e}") from None
    return RemoteRewardSpec(name=p.name, endpoint=p.endpoint, checkpoint_dir=p.checkpoint_dir,
                            weight=p.weight if p.HasField("weight") else 1.0, timeout_s=p.timeout_s or 10.0,
                            batch_size=p.batch_size or 64, token=token)


def info_to_proto(info: dict) -> control_pb2.RewardModelInfo:
    s = info["spec"]
    spec = control_pb2.RewardModelSpec(name=s.name, weight=s.weight, timeout_s=s.timeout_s, batch_size=s.batch_size)
    if s.endpoint:
        spec.endpoint = s.endpoint
    else:
        spec.checkpoint_dir = s.checkpoint_dir
    return control_pb2.RewardModelInfo(spec=spec, healthy=info["healthy"], scored=info["scored"],
                                       failed=info["failed"], reward_mean=info["reward_mean"],
                                       last_error=info["last_error"])


class ControlServicer(control_pb2_grpc.ControlServicer):
    """Thin: protobuf in, registry/status call, protobuf out, ControlError -> status code."""

    def __init__(self, registry: RewardRegistry, status_fn, client_token_file: str | None = None, scale_fn=None):
        self.registry = registry
        self.status_fn = status_fn
        self.scale_fn = scale_fn
        self.client_token_file = client_token_file

    def _call(self, context, fn, *args):
        try:
            return fn(*args)
        except ControlError as e:
            context.abort(e.code, str(e))

    def RegisterRewardModel(self, request, context):
        spec = self._call(context, spec_from_proto, request.spec, self.client_token_file)
        info = self._call(context, self.registry.register, spec)
        return control_pb2.RegisterRewardModelResponse(model=info_to_proto(info))

    def RemoveRewardModel(self, request, context):
        self._call(context, self.registry.remove, request.name)
        return control_pb2.RemoveRewardModelResponse()

    def ListRewardModels(self, request, context):
        return control_pb2.ListRewardModelsResponse(models=[info_to_proto(i) for i in self.registry.list()])

    def GetStatus(self, request, context):
        return control_pb2.GetStatusResponse(**self.status_fn())

    def ScaleRollout(self, request, context):
        if self.scale_fn is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this server cannot scale rollout workers")
        if request.num_workers < 1:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"num_workers must be >= 1, got {request.num_workers}")
        previous = self.status_fn().get("rollout_workers", 0)
        return control_pb2.ScaleRolloutResponse(previous=previous, target=self.scale_fn(request.num_workers))


def start_control_server(registry: RewardRegistry, status_fn, cfg, scale_fn=None):
    """Serve Control with the common server setup (auth, health, reflection, limits)."""
    from actors.serving import serve

    servicer = ControlServicer(registry, status_fn, client_token_file=os.environ.get("FLEETRL_REWARD_TOKEN_FILE"),
                               scale_fn=scale_fn)
    return serve(cfg, lambda server: control_pb2_grpc.add_ControlServicer_to_server(servicer, server), [SERVICE_NAME])
