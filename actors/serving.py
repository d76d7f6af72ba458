"""What every fleetrl gRPC server has: auth, TLS, health, reflection, limits, shutdown.

``serve(...)`` builds a ``grpc.server`` with

* **token auth**: every call except the standard health service must carry
  metadata ``authorization: Bearer <token>`` (the scheme is case-insensitive,
  RFC 6750; the token is compared in constant time); the token comes from
  ``FLEETRL_TOKEN`` or a file. With no token configured the server binds
  loopback only and logs a warning; a token on a non-loopback address without
  TLS logs that the token travels in plaintext;
* optional **TLS** (certificate + key files, checked before binding: a bad
  pair is a one-line ``ValueError`` naming the files);
* **malformed requests** (bytes that do not parse as the method's request
  message) fail ``INVALID_ARGUMENT`` in every service (grpc's own default is
  ``INTERNAL``);
* the standard **grpc.health.v1** service (SERVING while up, NOT_SERVING
  during shutdown) and **server reflection**, so stock clients such as
  ``grpcurl`` can list, describe and call the services;
* a **max message size** both ways (oversize calls fail RESOURCE_EXHAUSTED);
* **graceful shutdown**: health flips to NOT_SERVING, in-flight calls get
  ``grace_s`` to finish, new calls are refused.

Clients: ``channel`` (TLS or plaintext, the same size limits), ``client_metadata``
(the bearer token) and ``CircuitBreaker`` (the reward-model and environment
clients fail fast while a server keeps failing).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)

TOKEN_ENV = "FLEETRL_TOKEN"
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
_UNAUTHENTICATED_METHODS = ("/grpc.health.v1.Health/",)


def load_token(token_file: str | None = None, env: str = TOKEN_ENV) -> str | None:
    """The shared secret: from ``token_file`` if given, else ``$FLEETRL_TOKEN``; None if neither."""
    if token_file:
        token = Path(token_file).read_text().strip()
        if not token:
            raise ValueError(f"token file {token_file} is empty")
        return token
    return (os.environ.get(env) or "").strip() or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
_BUILDERS = {"unary_unary": grpc.unary_unary_rpc_method_handler, "unary_stream": grpc.unary_stream_rpc_method_handler,
             "stream_unary": grpc.stream_unary_rpc_method_handler,
             "stream_stream": grpc.stream_stream_rpc_method_handler}


def _kind(handler) -> str:
    return next(k for k in _KINDS if getattr(handler, k, None) is not None)


def _aborting(handler, code: grpc.StatusCode, details: str):
    """A handler of the same kind as ``handler`` (unary if None) that fails every call with ``code``."""
    def behavior(request, context):
        context.abort(code, details)

    kind = _kind(handler) if handler is not None else "unary_unary"
    return _BUILDERS[kind](behavior)


def bearer_token_matches(header: str, token: str) -> bool:
    """``header`` is ``Bearer <token>`` (scheme case-insensitive, RFC 6750); constant-time compare."""
    scheme, _, credentials = header.strip().partition(" ")
    ok_scheme = scheme.lower() == "bearer"
    ok_token = hmac.compare_digest(credentials.strip().encode(), token.encode())
    return ok_scheme and ok_token


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Rejects calls without ``authorization: Bearer <token>`` (health checks exempt)."""

    def __init__(self, token: str):
        self._token = token

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(_UNAUTHENTICATED_METHODS):
            return continuation(handler_call_details)
        got = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if bearer_token_matches(got, self._token):
            return continuation(handler_call_details)
        return _aborting(continuation(handler_call_details), grpc.StatusCode.UNAUTHENTICATED,
                         "missing or wrong bearer token")


class _Malformed:
    """What the guarded deserializer returns for bytes that do not parse."""

    def __init__(self, error: Exception):
        self.error = error


class MalformedRequestInterceptor(grpc.ServerInterceptor):
    """Malformed request bytes fail ``INVALID_ARGUMENT`` (grpc's default: INTERNAL, "Exception
    deserializing request!"): the method's deserializer is wrapped so a parse error becomes a
    marker that the behaviour turns into an abort on the handler thread."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        method, parse = handler_call_details.method, handler.request_deserializer

        def deserialize(data: bytes):
            try:
                return parse(data)
            except Exception as e:  # noqa: BLE001 - any parse failure is the client's bytes
                return _Malformed(e)

        def check(request, context):
            if isinstance(request, _Malformed):
                e = request.error
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"malformed request to {method}: {type(e).__name__}: {str(e)[:200]}")
            return request

        kind = _kind(handler)
        inner = getattr(handler, kind)
        if kind.startswith("unary"):
            def behavior(request, context):
                return inner(check(request, context), context)
        else:
            def behavior(requests, context):
                return inner((check(r, context) for r in requests), context)
        return _BUILDERS[kind](behavior, request_deserializer=deserialize,
                               response_serializer=handler.response_serializer)


def _check_tls_pair(cert: str, key: str) -> tuple[bytes, bytes]:
    """The PEM bytes of a certificate chain and its key, or a one-line ValueError saying which
    is unreadable or that the pair is invalid (checked with :mod:`ssl`, before grpc sees it)."""
    import ssl

    pem = {}
    for what, path in (("certificate", cert), ("key", key)):
        try:
            pem[what] = Path(path).read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read TLS {what} {path}: {e.strerror or e}") from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=lambda: b"")
    except (ssl.SSLError, OSError) as e:
        raise ValueError(f"invalid TLS certificate/key ({cert}, {key}): not a PEM certificate chain and its "
                         f"unencrypted private key ({getattr(e, 'reason', None) or e})") from None
    return pem["certificate"], pem["key"]


@dataclass(kw_only=True)
class ServerConfig:
    host: str = "127.0.0.1"
    """Address to bind; without a token only loopback addresses are allowed."""
    port: int = 0
    """Port to bind, 1..65535; 0 picks a free one (printed at start)."""
    token_file: str | None = None
    """File holding the bearer token; default: the FLEETRL_TOKEN environment variable."""
    tls_cert: str | None = None
    """PEM certificate chain; with tls_key, serve TLS instead of plaintext."""
    tls_key: str | None = None
    """PEM private key for tls_cert."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    """Largest request or response accepted (larger: RESOURCE_EXHAUSTED)."""
    max_workers: int = 8
    """Threads serving calls concurrently."""


@dataclass
class RunningServer:
    server: grpc.Server
    port: int
    host: str
    health: health.HealthServicer
    services: list[str] = field(default_factory=list)
    authenticated: bool = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, grace_s: float = 5.0, lame_duck_s: float = 0.5) -> None:
        """Flip health to NOT_SERVING and keep accepting calls for ``lame_duck_s`` (so
        health checkers see it), then refuse new calls and let in-flight ones finish
        (up to ``grace_s``)."""
        self.health.enter_graceful_shutdown()  # idempotent: a second stop() only waits again
        if lame_duck_s > 0 and grace_s > 0:
            time.sleep(min(lame_duck_s, grace_s))
        self.server.stop(grace_s).wait()


def serve(cfg: ServerConfig, add_servicers, service_names: list[str]) -> RunningServer:
    """Start a server; ``add_servicers(server)`` registers the services named in
    ``service_names`` (full names, e.g. ``fleetrl.reward.v1.RewardModel``)."""
    if not (isinstance(cfg.port, int) and 0 <= cfg.port <= 65535):
        raise ValueError(f"port must be 1..65535, or 0 for a free port (got {cfg.port!r})")
    tls = None
    if cfg.tls_cert or cfg.tls_key:
        if not (cfg.tls_cert and cfg.tls_key):
            raise ValueError("TLS needs both a certificate and a key")
        tls = _check_tls_pair(cfg.tls_cert, cfg.tls_key)
    token = load_token(cfg.token_file)
    host = cfg.host
    if token is None and not is_loopback(host):
        log.warning("no token configured (%s or --token-file): binding 127.0.0.1 instead of %s", TOKEN_ENV, host)
        host = "127.0.0.1"
    elif token is None:
        log.warning("no token configured (%s or --token-file): unauthenticated, loopback only", TOKEN_ENV)
    elif tls is None and not is_loopback(host):
        log.warning("serving %s without TLS: the bearer token travels in plaintext (set a TLS certificate and key)",
                    host)
    options = [("grpc.max_receive_message_length", cfg.max_message_bytes),
               ("grpc.max_send_message_length", cfg.max_message_bytes),
               ("grpc.so_reuseport", 0)]
    interceptors = [*([TokenAuthInterceptor(token)] if token else []), MalformedRequestInterceptor()]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=cfg.max_workers), interceptors=interceptors,
                         options=options)
    add_servicers(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    bind = f"[{host}]:{cfg.port}" if ":" in host else f"{host}:{cfg.port}"
    try:
        if tls is not None:
            port = server.add_secure_port(bind, grpc.ssl_server_credentials([(tls[1], tls[0])]))
        else:
            port = server.add_insecure_port(bind)
    except RuntimeError as e:  # grpc reports a failed bind this way
        raise OSError(f"cannot bind {bind}: {e}") from None
    if port == 0:
        raise OSError(f"cannot bind {bind}")
    for name in ["", *service_names]:  # before start: no window where a check says NOT_FOUND
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    server.start()
    return RunningServer(server, port, host, health_servicer, list(service_names), authenticated=token is not None)


def client_metadata(token: str | None) -> tuple:
    return (("authorization", f"Bearer {token}"),) if token else ()


def channel(target: str, *, tls_ca: bytes | None = None, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
    """A client channel to ``target``: TLS verified against ``tls_ca`` (PEM certificate
    bytes, not a path: the caller reads the file where it lives), else plaintext."""
    options = [("grpc.max_receive_message_length", max_message_bytes),
               ("grpc.max_send_message_length", max_message_bytes)]
    if tls_ca:
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(tls_ca), options=options)
    return grpc.insecure_channel(target, options=options)


class CircuitBreaker:
    """closed -> (threshold consecutive failures) -> open -> (cooldown) -> half-open trial."""

    def __init__(self, threshold: int, cooldown_s: float, clock=time.monotonic):
        self.threshold, self.cooldown_s, self.clock = threshold, cooldown_s, clock
        self.failures = 0
        self.opened_at: float | None = None
        self.trial = False  # one caller is testing the server while the circuit is open
        self.lock = threading.Lock()

    @property
    def healthy(self) -> bool:
        return self.opened_at is None

    def allow(self) -> bool:
        """Closed: yes. Open: no, except one trial call per cooldown."""
        with self.lock:
            if self.opened_at is None:
                return True
            if not self.trial and self.clock() - self.opened_at >= self.cooldown_s:
                self.trial = True
                return True
            return False

    def record(self, success: bool) -> None:
        with self.lock:
            self.trial = False
            if success:
                self.failures, self.opened_at = 0, None
                return
            self.failures += 1
            if self.failures >= self.threshold:  # open, or re-open (new cooldown) after a failed trial
                self.opened_at = self.clock()
