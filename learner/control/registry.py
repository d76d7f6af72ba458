"""Run-time reward models of one training run: validate, register, remove, list.

Plain logic on the driver side (the Control servicer calls it from gRPC
threads, so it is thread-safe). Registering a reward model starts a
``RewardModelActor`` for it, probes it, and hands the new model list to every
reward worker; the next batch they score includes it in the weighted sum.
Removing does the reverse. Errors are ``ControlError(status code, message)``.
"""

from __future__ import annotations

import logging
import math
import threading

import grpc
import ray

from actors.reward.models import RewardModelSpec
from actors.runtime.actors import create_reward_model_actor

log = logging.getLogger(__name__)

MAX_WEIGHT = 1e6
MAX_TIMEOUT_S = 600.0
MAX_ATTEMPTS = 10
MAX_FAILURE_THRESHOLD = 1000
MAX_COOLDOWN_S = 3600.0
MAX_TLS_CA_BYTES = 64 * 1024
PUSH_TIMEOUT_S = 60.0


class ControlError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def _endpoint_ok(endpoint: str) -> bool:
    host, sep, port = endpoint.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def validate_spec(spec: RewardModelSpec) -> RewardModelSpec:
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
    _validate_client(spec)
    return spec


def _validate_client(spec: RewardModelSpec) -> None:
    """The remote client's settings: TLS CA, retries and circuit breaker, each bounded."""
    bad = grpc.StatusCode.INVALID_ARGUMENT
    if spec.tls_ca is not None:
        if spec.checkpoint_dir:
            raise ControlError(bad, "tls_ca_pem is for an endpoint, not a checkpoint_dir")
        if len(spec.tls_ca) > MAX_TLS_CA_BYTES or b"-----BEGIN CERTIFICATE-----" not in spec.tls_ca:
            raise ControlError(bad, f"tls_ca_pem must be PEM certificate(s) of at most {MAX_TLS_CA_BYTES} bytes")
    if not 1 <= spec.max_attempts <= MAX_ATTEMPTS:
        raise ControlError(bad, f"max_attempts {spec.max_attempts} must be in [1, {MAX_ATTEMPTS}]")
    if not 1 <= spec.failure_threshold <= MAX_FAILURE_THRESHOLD:
        raise ControlError(bad, f"failure_threshold {spec.failure_threshold} must be in [1, {MAX_FAILURE_THRESHOLD}]")
    if not (math.isfinite(spec.cooldown_s) and 0 < spec.cooldown_s <= MAX_COOLDOWN_S):
        raise ControlError(bad, f"cooldown_s {spec.cooldown_s} must be in (0, {MAX_COOLDOWN_S:g}]")


class RewardRegistry:
    """Run-time reward models of one training run (thread-safe: gRPC calls arrive on threads)."""

    def __init__(self, reward_actors: list, reserved_names: list[str]):
        self.reward_actors = reward_actors
        self.reserved = set(reserved_names)
        self.models: dict[str, tuple[RewardModelSpec, object]] = {}
        self.lock = threading.Lock()

    def _push(self) -> None:
        """Hand the model list to every reward worker (they apply it at their next batch)."""
        models = [(name, spec.weight, handle, spec.timeout_s * spec.max_attempts, spec.batch_size)
                  for name, (spec, handle) in self.models.items()]
        ray.get([a.set_models.remote(models) for a in self.reward_actors], timeout=PUSH_TIMEOUT_S)

    def register(self, spec: RewardModelSpec) -> dict:
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
