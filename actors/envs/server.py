"""Serve an environment over gRPC (``fleetrl.env.v1.Environment``): ``fleetrl env serve``.

Any environment class (``module:Class`` or a built-in name, with ``--args`` as JSON)
hosted behind the same server contract as the reward server (``actors.serving``:
token auth, TLS, health, reflection, message limits, malformed-request handling,
graceful shutdown). Episodes live in an ``EpisodeStore``: ``Reset`` opens one under
a fresh id, ``Step`` advances it, ``Close`` finishes and forgets it; an episode idle
for ``idle_s`` is dropped, and at most ``max_episodes`` are open at once. Retries are
idempotent: a ``Reset`` or ``Step`` repeated with the same ``request_id`` gets the
first call's answer (the client retries UNAVAILABLE with the same id).

The request handling is plain functions over the store; the servicer maps their
exceptions to status codes:

* an unknown or expired episode id, a bad request -> ``INVALID_ARGUMENT`` / ``NOT_FOUND``;
* ``max_episodes`` open -> ``RESOURCE_EXHAUSTED``;
* the environment raised or returned garbage -> ``INTERNAL`` (the client excludes the
  episode as ``env_error``; never a made-up observation).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc

from actors.envs.base import StepResult
from actors.envs.config import make_env
from actors.serving import RunningServer, ServerConfig, serve
from actors.validation import ConfigError
from protos import env_pb2, env_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = env_pb2.DESCRIPTOR.services_by_name["Environment"].full_name
PROG = "fleetrl env serve"


class UnknownEpisode(KeyError):
    """No open episode has this id (never opened, closed, or dropped after ``idle_s``)."""


class TooManyEpisodes(RuntimeError):
    """``max_episodes`` are open (maps to RESOURCE_EXHAUSTED)."""


class EnvFailed(RuntimeError):
    """The environment raised or broke its contract (maps to INTERNAL)."""


@dataclass
class _Open:
    state: Any
    lock: threading.Lock = field(default_factory=threading.Lock)
    touched: float = field(default_factory=time.monotonic)
    last: tuple[str, StepResult] | None = None
    """The last Step's request_id and result: a retry of it gets the same answer, not a second step."""


class EpisodeStore:
    """Open episodes of one environment instance, by id (thread-safe; each episode's calls are
    serialised, different episodes run concurrently)."""

    def __init__(self, env, *, max_episodes: int = 4096, idle_s: float = 600.0):
        self.env, self.max_episodes, self.idle_s = env, max_episodes, idle_s
        self.open: dict[str, _Open] = {}
        self.opened_by: dict[str, str] = {}  # Reset request_id -> episode id: a retried Reset opens nothing new
        self.lock = threading.Lock()

    def _expire(self) -> None:
        now = time.monotonic()
        for eid in [e for e, o in self.open.items() if now - o.touched > self.idle_s]:
            del self.open[eid]
        live = set(self.open)
        self.opened_by = {r: e for r, e in self.opened_by.items() if e in live}

    def reset(self, prompt: str, metadata: dict[str, str], request_id: str = "") -> str:
        with self.lock:
            self._expire()
            if request_id and request_id in self.opened_by:
                return self.opened_by[request_id]
            if len(self.open) >= self.max_episodes:
                raise TooManyEpisodes(f"{len(self.open)} episodes are open (--max-episodes {self.max_episodes})")
        state = _run(lambda: self.env.reset(prompt, metadata))
        eid = uuid.uuid4().hex
        with self.lock:
            self.open[eid] = _Open(state)
            if request_id:
                self.opened_by[request_id] = eid
        return eid

    def _get(self, eid: str) -> _Open:
        with self.lock:
            self._expire()
            ep = self.open.get(eid)
        if ep is None:
            raise UnknownEpisode(f"no open episode {eid!r} (closed, or idle for more than {self.idle_s:g} s)")
        return ep

    def step(self, eid: str, completion: str, request_id: str = "") -> StepResult:
        ep = self._get(eid)
        with ep.lock:
            ep.touched = time.monotonic()
            if request_id and ep.last is not None and ep.last[0] == request_id:
                return ep.last[1]  # a retry: the answer already given, the episode not advanced twice
            result = _run(lambda: self.env.step(ep.state, completion))
            if not isinstance(result, StepResult):
                raise EnvFailed(f"step returned {type(result).__name__}, not a StepResult")
            ep.last = (request_id, result)
        return result

    def close(self, eid: str) -> dict[str, Any]:
        ep = self._get(eid)
        with self.lock:
            self.open.pop(eid, None)
        with ep.lock:
            return dict(_run(lambda: self.env.finish(ep.state)) or {})


def _run(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - environment code may raise anything: INTERNAL, one line
        raise EnvFailed(f"{type(e).__name__}: {str(e)[:300]}") from None


# -- requests as plain functions ------------------------------------------------------------------
def reset_request(store: EpisodeStore, request: env_pb2.ResetRequest) -> env_pb2.ResetResponse:
    return env_pb2.ResetResponse(episode_id=store.reset(request.prompt, dict(request.metadata), request.request_id))


def step_request(store: EpisodeStore, request: env_pb2.StepRequest) -> env_pb2.StepResponse:
    if not request.episode_id:
        raise ValueError("episode_id is empty")
    r = store.step(request.episode_id, request.completion, request.request_id)
    observation = [env_pb2.Message(role=str(m["role"]), content=str(m["content"])) for m in (r.observation or [])]
    info = {k: float(v) for k, v in r.info.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return env_pb2.StepResponse(observation=observation, done=r.done, info=info)


def close_request(store: EpisodeStore, request: env_pb2.CloseRequest) -> env_pb2.CloseResponse:
    return env_pb2.CloseResponse(metadata={k: json.dumps(v) for k, v in store.close(request.episode_id).items()})


def metadata_response(store: EpisodeStore, name: str) -> env_pb2.EnvMetadata:
    module = sys.modules.get(type(store.env).__module__)
    return env_pb2.EnvMetadata(name=name, version=str(getattr(module, "__version__", "")),
                               stop=list(getattr(store.env, "stop", ())), max_episodes=store.max_episodes)


_CODES = [(ValueError, grpc.StatusCode.INVALID_ARGUMENT), (UnknownEpisode, grpc.StatusCode.NOT_FOUND),
          (TooManyEpisodes, grpc.StatusCode.RESOURCE_EXHAUSTED), (EnvFailed, grpc.StatusCode.INTERNAL)]


class EnvironmentServicer(env_pb2_grpc.EnvironmentServicer):
    """Thin: each method calls its plain function and maps the exception to a status code."""

    def __init__(self, store: EpisodeStore, name: str):
        self.store, self.name = store, name

    def _call(self, context, fn, request):
        try:
            return fn(self.store, request)
        except Exception as e:  # noqa: BLE001 - mapped to a status below
            code = next((c for kind, c in _CODES if isinstance(e, kind)), grpc.StatusCode.INTERNAL)
            if code == grpc.StatusCode.INTERNAL:
                log.warning("%s: %s", type(e).__name__, e)
            context.abort(code, str(e).strip("'\""))

    def Reset(self, request, context):
        return self._call(context, reset_request, request)

    def Step(self, request, context):
        return self._call(context, step_request, request)

    def Close(self, request, context):
        return self._call(context, close_request, request)

    def GetMetadata(self, request, context):
        return metadata_response(self.store, self.name)


def start_env_server(env, cfg: ServerConfig, *, name: str, max_episodes: int = 4096,
                     idle_s: float = 600.0) -> RunningServer:
    servicer = EnvironmentServicer(EpisodeStore(env, max_episodes=max_episodes, idle_s=idle_s), name)
    return serve(cfg, lambda server: env_pb2_grpc.add_EnvironmentServicer_to_server(servicer, server), [SERVICE_NAME])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Serve an environment over gRPC (fleetrl.env.v1).")
    p.add_argument("env", metavar="ENV", help="module:Class, or a built-in (calculator, python, tools)")
    p.add_argument("--args", default="{}", help="the constructor's keyword arguments as JSON")
    p.add_argument("--name", help="name reported by GetMetadata (default: ENV)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (without a token: loopback only)")
    p.add_argument("--port", type=int, default=0, help="port to bind, 1..65535 (0: a free one, printed)")
    p.add_argument("--token-file", help="bearer token file (default: $FLEETRL_TOKEN)")
    p.add_argument("--tls-cert", help="PEM certificate chain (with --tls-key)")
    p.add_argument("--tls-key", help="PEM private key (with --tls-cert)")
    p.add_argument("--max-episodes", type=int, default=4096, help="open episodes at most (RESOURCE_EXHAUSTED beyond)")
    p.add_argument("--idle-s", type=float, default=600.0, help="an episode idle this long is dropped")
    p.add_argument("--grace-s", type=float, default=5.0, help="seconds in-flight calls get at shutdown")
    return p


def main_serve(argv: list[str]) -> int:
    """``fleetrl env serve``: prints ``listening on HOST:PORT`` once serving; one line per error."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse printed usage and the error
        return int(e.code or 0)
    try:
        env_args = json.loads(args.args)
        if not isinstance(env_args, dict):
            raise ValueError("--args must be a JSON object")
        env = make_env(args.env, env_args)
        if not (0 <= args.port <= 65535) or args.max_episodes < 1 or args.idle_s <= 0 or args.grace_s < 0:
            raise ValueError("--port 0..65535, --max-episodes >= 1, --idle-s > 0, --grace-s >= 0")
        server = start_env_server(env, ServerConfig(host=args.host, port=args.port, token_file=args.token_file,
                                                    tls_cert=args.tls_cert, tls_key=args.tls_key),
                                  name=args.name or args.env, max_episodes=args.max_episodes, idle_s=args.idle_s)
    except (ConfigError, ValueError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        print(f"{PROG}: {args.name or args.env} listening on {server.address}", flush=True)
        stop.wait()
        server.stop(args.grace_s)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 0
