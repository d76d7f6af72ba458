"""``RemoteEnvironment``: an environment behind a ``fleetrl.env.v1.Environment`` server.

It is an ``Environment`` like any other (the rollout worker cannot tell), so the
episode loop's rules apply: whatever goes wrong ends that episode as an excluded
sample, never as an observation the server did not send:

* every call has a deadline (``timeout_s``); a missed one raises ``EnvTimeout``
  (the episode is ``env_timeout``);
* only UNAVAILABLE is retried, with exponential backoff, at most ``max_attempts``
  tries inside the deadline (a ``Step`` is retried with the same ``request_id``);
* a **circuit breaker**: after ``failure_threshold`` consecutive calls the server did
  not answer (unavailable, past the deadline, refused: not an error of one episode's
  environment) it is unhealthy and calls fail fast (``EnvError``) for ``cooldown_s``;
  then one trial call is let through;
* any other status (INTERNAL: the environment raised; NOT_FOUND: the episode is
  gone) raises ``EnvError`` naming the endpoint and the status (``env_error``).

``Close`` returns the environment's ``finish`` (values JSON-decoded where they parse).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

import grpc

from actors.envs.base import EnvError, Environment, EnvTimeout, StepResult
from actors.serving import CircuitBreaker, channel, client_metadata, load_token
from actors.validation import require
from protos import env_pb2, env_pb2_grpc

BACKOFF_S = 0.1


@dataclass(kw_only=True)
class RemoteEnvSpec:
    endpoint: str
    """HOST:PORT of the server."""
    timeout_s: float = 10.0
    """Deadline of one call (Reset, Step or Close)."""
    max_attempts: int = 3
    """Tries per call; only UNAVAILABLE is retried."""
    failure_threshold: int = 3
    """Consecutive failed calls that open the circuit (calls then fail fast)."""
    cooldown_s: float = 5.0
    """How long an open circuit fails fast before one trial call."""
    token_file: str | None = None
    """Bearer token file for the server (default: $FLEETRL_ENV_TOKEN, none when unset)."""
    token: str | None = field(default=None, repr=False)
    """The bearer token itself (an environment registered over Control brings its own)."""
    run_token: bool = True
    """Whether the run's own ``$FLEETRL_ENV_TOKEN`` may go to this server: yes for ``env.name``
    (the run's config), never for an environment a Control client registered."""
    tls_ca: bytes | None = None
    """PEM CA certificate of the server's TLS (plaintext when empty)."""

    def __post_init__(self):
        host, _, port = self.endpoint.rpartition(":")
        require(bool(host) and port.isdigit() and 0 < int(port) < 65536, "env.name",
                f"grpc://HOST:PORT expected, got endpoint {self.endpoint!r}")
        require(self.timeout_s > 0 and self.max_attempts >= 1 and self.failure_threshold >= 1 and self.cooldown_s >= 0,
                "env.args", "timeout_s > 0, max_attempts >= 1, failure_threshold >= 1, cooldown_s >= 0")


class RemoteEnvironment(Environment):
    """Episodes hosted by a remote server; the state of an episode is its id there."""

    def __init__(self, spec: RemoteEnvSpec):
        self.spec = spec
        self.channel = channel(spec.endpoint, tls_ca=spec.tls_ca)
        self.stub = env_pb2_grpc.EnvironmentStub(self.channel)
        token = spec.token or (load_token(spec.token_file, env="FLEETRL_ENV_TOKEN") if spec.run_token else None)
        self.metadata = client_metadata(token)
        self.circuit = CircuitBreaker(spec.failure_threshold, spec.cooldown_s)
        try:
            self.stop = tuple(self._call("GetMetadata", env_pb2.GetMetadataRequest()).stop)
        except EnvError:
            self.close()
            raise

    def close(self) -> None:
        """Release the channel (an environment dropped by the worker or a failed probe)."""
        self.channel.close()

    def reset(self, prompt, metadata):
        request = env_pb2.ResetRequest(prompt=prompt, request_id=uuid.uuid4().hex,
                                       metadata={str(k): _text(v) for k, v in metadata.items()})
        return self._call("Reset", request).episode_id

    def step(self, state, completion):
        r = self._call("Step", env_pb2.StepRequest(episode_id=state, completion=completion, request_id=uuid.uuid4().hex))
        return StepResult(observation=[{"role": m.role, "content": m.content} for m in r.observation] or None,
                          done=r.done, info=dict(r.info))

    def finish(self, state):
        return {k: _decoded(v) for k, v in self._call("Close", env_pb2.CloseRequest(episode_id=state)).metadata.items()}

    def _call(self, method: str, request):
        if not self.circuit.allow():
            raise EnvError(f"{self.spec.endpoint}: unhealthy ({self.spec.failure_threshold} calls failed in a row; "
                           f"failing fast for {self.spec.cooldown_s:g} s)")
        deadline = time.monotonic() + self.spec.timeout_s
        backoff = BACKOFF_S
        for attempt in range(1, self.spec.max_attempts + 1):
            left = deadline - time.monotonic()
            try:
                reply = getattr(self.stub, method)(request, timeout=max(left, 0.001), metadata=self.metadata)
                self.circuit.record(True)
                return reply
            except grpc.RpcError as e:
                code = e.code()
                retry = code == grpc.StatusCode.UNAVAILABLE and attempt < self.spec.max_attempts \
                    and deadline - time.monotonic() > backoff
                if retry:
                    time.sleep(backoff)
                    backoff *= 2
                    continue
                # the server answered, for this episode alone (its environment raised, the episode is
                # gone, no room for another): the episode fails, the server is not unhealthy
                self.circuit.record(code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.NOT_FOUND,
                                             grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED))
                what = f"{self.spec.endpoint} {method}: {code.name}: {(e.details() or '')[:200]}"
                raise (EnvTimeout if code == grpc.StatusCode.DEADLINE_EXCEEDED else EnvError)(what) from None
        raise EnvError(f"{self.spec.endpoint} {method}: no attempt left")  # unreachable: the loop returns or raises


def _text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _decoded(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text
