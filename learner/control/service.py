"""The Control gRPC service a running ``fleetrl train`` hosts (``fleetrl.control.v1``).

Thin: the servicer translates protobuf <-> Python and ``ControlError`` ->
status codes; the logic is ``registry.RewardRegistry`` and the trainer's
status and scale functions. The rules on what a client may register (allowed
endpoints, per-model tokens, checkpoint roots, caps) are in ``registry``;
``ScaleRollout`` above the fleet's maximum is refused (OUT_OF_RANGE), not capped.
"""

from __future__ import annotations

from dataclasses import replace

import grpc

from actors.reward.models import RewardModelSpec
from actors.serving import serve
from actors.validation import ConfigError
from learner.control.envs import EnvRegistry, spec_of
from learner.control.registry import ControlError, RewardRegistry
from protos import control_pb2, control_pb2_grpc

SERVICE_NAME = control_pb2.DESCRIPTOR.services_by_name["Control"].full_name
SPARE_THREADS = 4
"""Control server threads beyond control.max_reward_models (each registration holds one while it probes)."""


# -- protobuf translation ------------------------------------------------------------------------
def spec_from_proto(p: control_pb2.RewardModelSpec) -> RewardModelSpec:
    """Proto -> spec, defaults for unset (0) fields. ``token`` is the registration's own token
    (None when unset); the registry decides whether the run's reward token may be used instead
    (``registry.RewardRegistry._authorize``: only for control.allowed_reward_endpoints)."""
    d = RewardModelSpec(name="")
    return RewardModelSpec(name=p.name, endpoint=p.endpoint, checkpoint_dir=p.checkpoint_dir,
                           weight=p.weight if p.HasField("weight") else d.weight, timeout_s=p.timeout_s or d.timeout_s,
                           batch_size=p.batch_size or d.batch_size, token=p.token or None, tls_ca=p.tls_ca_pem or None,
                           max_attempts=p.max_attempts or d.max_attempts,
                           failure_threshold=p.failure_threshold or d.failure_threshold,
                           cooldown_s=p.cooldown_s or d.cooldown_s)


def info_to_proto(info: dict) -> control_pb2.RewardModelInfo:
    """The registered spec (defaults filled in, never the token) and the model's counters."""
    s = info["spec"]
    spec = control_pb2.RewardModelSpec(name=s.name, weight=s.weight, timeout_s=s.timeout_s, batch_size=s.batch_size,
                                       tls_ca_pem=s.tls_ca or b"", max_attempts=s.max_attempts,
                                       failure_threshold=s.failure_threshold, cooldown_s=s.cooldown_s)
    if s.endpoint:
        spec.endpoint = s.endpoint
    else:
        spec.checkpoint_dir = s.checkpoint_dir
    return control_pb2.RewardModelInfo(spec=spec, healthy=info["healthy"], scored=info["scored"],
                                       failed=info["failed"], reward_mean=info["reward_mean"],
                                       last_error=info["last_error"], disabled=info.get("disabled", False),
                                       disabled_reason=info.get("disabled_reason", ""))


def env_info_to_proto(info: dict) -> control_pb2.EnvironmentInfo:
    s = info["spec"]
    return control_pb2.EnvironmentInfo(stop=list(info["stop"]), spec=control_pb2.EnvironmentSpec(
        name=info["name"], endpoint=s.endpoint, timeout_s=s.timeout_s, max_attempts=s.max_attempts,
        failure_threshold=s.failure_threshold, cooldown_s=s.cooldown_s, tls_ca_pem=s.tls_ca or b""))


def env_spec_from_proto(p: control_pb2.EnvironmentSpec):
    """Proto -> (name, ``RemoteEnvSpec``), defaults for unset (0) fields."""
    fields = dict(timeout_s=p.timeout_s, max_attempts=p.max_attempts, failure_threshold=p.failure_threshold,
                  cooldown_s=p.cooldown_s)
    return p.name, spec_of(p.endpoint, **{k: v for k, v in fields.items() if v}, token=p.token or None,
                           tls_ca=p.tls_ca_pem or None)


class ControlServicer(control_pb2_grpc.ControlServicer):
    """Thin: protobuf in, registry/status call, protobuf out, ControlError -> status code."""

    def __init__(self, registry: RewardRegistry, status_fn, scale_fn=None, envs: EnvRegistry | None = None):
        self.registry = registry
        self.status_fn = status_fn
        self.scale_fn = scale_fn
        self.envs = envs

    def _call(self, context, fn, *args):
        try:
            return fn(*args)
        except ControlError as e:
            context.abort(e.code, str(e))

    def RegisterRewardModel(self, request, context):
        info = self._call(context, self.registry.register, spec_from_proto(request.spec))
        return control_pb2.RegisterRewardModelResponse(model=info_to_proto(info))

    def RemoveRewardModel(self, request, context):
        self._call(context, self.registry.remove, request.name)
        return control_pb2.RemoveRewardModelResponse()

    def ListRewardModels(self, request, context):
        return control_pb2.ListRewardModelsResponse(models=[info_to_proto(i) for i in self.registry.list()])

    def _envs(self, context) -> EnvRegistry:
        if self.envs is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this server registers no environments")
        return self.envs

    def RegisterEnvironment(self, request, context):
        envs = self._envs(context)
        info = self._call(context, lambda: envs.register(*env_spec_from_proto(request.spec)))
        return control_pb2.RegisterEnvironmentResponse(env=env_info_to_proto(info))

    def RemoveEnvironment(self, request, context):
        self._call(context, self._envs(context).remove, request.name)
        return control_pb2.RemoveEnvironmentResponse()

    def ListEnvironments(self, request, context):
        return control_pb2.ListEnvironmentsResponse(envs=[env_info_to_proto(i) for i in self._envs(context).list()])

    def GetStatus(self, request, context):
        return control_pb2.GetStatusResponse(**self.status_fn())

    def ScaleRollout(self, request, context):
        """Refused above the fleet's maximum (OUT_OF_RANGE, the message says it and why), not capped."""
        if self.scale_fn is None:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "this server cannot scale rollout workers")
        previous = self.status_fn().get("rollout_workers", 0)
        try:  # the fleet validates the request (>= 1, within its maximum)
            target = self._call(context, self.scale_fn, request.num_workers)
        except ConfigError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return control_pb2.ScaleRolloutResponse(previous=previous, target=target)


def start_control_server(registry: RewardRegistry, status_fn, cfg, scale_fn=None, envs: EnvRegistry | None = None):
    """Serve Control with the common server setup (auth, health, reflection, limits). The
    server gets enough threads that registrations probing at once (at most
    control.max_reward_models) leave SPARE_THREADS for status, listing and the rest."""
    cfg = replace(cfg, max_workers=max(cfg.max_workers, registry.control.max_reward_models + SPARE_THREADS))
    servicer = ControlServicer(registry, status_fn, scale_fn=scale_fn, envs=envs)
    return serve(cfg, lambda server: control_pb2_grpc.add_ControlServicer_to_server(servicer, server), [SERVICE_NAME])
