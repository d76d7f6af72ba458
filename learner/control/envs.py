"""Environments registered while training runs: ``fleetrl env add/remove/list`` over Control.

A registered environment is a ``fleetrl env serve`` server known by a name; the
dataset rows whose ``env.key`` column names it run their episodes there (a row
naming an environment that is not registered is excluded, ``env_unknown``).
Registering validates the endpoint (``rules.parse_endpoint``), probes the server
(``GetMetadata``, with the registration's own token) outside the lock, then pushes
the whole set to every rollout worker through ``push``, which the fleet also
hands to the workers it starts later. Removing a name pushes the set without it:
episodes already running finish against the server; new rows naming it are
excluded.
"""

from __future__ import annotations

import dataclasses
import re
import threading
from typing import Callable

import grpc

from actors.envs.base import EnvError
from actors.envs.config import BUILTIN_ENVS
from actors.envs.remote import RemoteEnvironment, RemoteEnvSpec
from actors.validation import ConfigError
from learner.control.rules import ControlError, one_line, parse_endpoint

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class EnvRegistry:
    def __init__(self, push: Callable[[dict[str, RemoteEnvSpec]], None], *, max_envs: int = 8,
                 reserved: tuple[str, ...] = ()):
        self.push, self.max_envs, self.reserved = push, max_envs, set(reserved)
        self.push_lock = threading.Lock()  # pushes in order: the workers end on the newest set
        self.specs: dict[str, RemoteEnvSpec] = {}
        self.stops: dict[str, tuple[str, ...]] = {}
        self.pending: set[str] = set()
        self.lock = threading.Lock()

    def register(self, name: str, spec: RemoteEnvSpec) -> dict:
        if not NAME.fullmatch(name or ""):
            raise ControlError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"environment name {one_line(name, 80)!r}: 1-64 letters, digits, '_', '.', '-'")
        if name in BUILTIN_ENVS or name in self.reserved:  # a client must not take over the run's own
            raise ControlError(grpc.StatusCode.INVALID_ARGUMENT, f"environment name {name!r} is the run's own "
                               f"(built-in or env.name); choose another")
        parse_endpoint(spec.endpoint)
        with self.lock:
            if name in self.specs or name in self.pending:
                raise ControlError(grpc.StatusCode.ALREADY_EXISTS, f"environment {name!r} is registered; remove it first")
            if len(self.specs) + len(self.pending) >= self.max_envs:
                raise ControlError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"at most {self.max_envs} environments")
            self.pending.add(name)
        try:
            probe = RemoteEnvironment(spec)  # GetMetadata: is it there, and does it take the token?
            stop = probe.stop
            probe.close()
        except EnvError as e:
            raise ControlError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"environment {name!r} is not usable: {one_line(str(e))}") from None
        finally:
            with self.lock:
                self.pending.discard(name)
        with self.lock:
            self.specs[name], self.stops[name] = spec, stop
        self._push()
        return self.info(name)

    def _push(self) -> None:
        with self.push_lock:  # the set as it is when this push runs, never an older one after a newer
            self.push(self.current())

    def remove(self, name: str) -> None:
        with self.lock:
            if self.specs.pop(name, None) is None:
                raise ControlError(grpc.StatusCode.NOT_FOUND, f"no environment {name!r} is registered")
            self.stops.pop(name, None)
        self._push()

    def info(self, name: str) -> dict:
        with self.lock:
            return {"name": name, "spec": dataclasses.replace(self.specs[name], token=None), "stop": self.stops[name]}

    def list(self) -> list[dict]:
        with self.lock:
            names = sorted(self.specs)
        return [self.info(n) for n in names]

    def current(self) -> dict[str, RemoteEnvSpec]:
        with self.lock:
            return dict(self.specs)


def spec_of(endpoint: str, **kw) -> RemoteEnvSpec:
    """A ``RemoteEnvSpec`` from a Control request's fields (its own token only: the run's
    ``$FLEETRL_ENV_TOKEN`` never goes to a server a client named); INVALID_ARGUMENT naming what is wrong."""
    try:
        return RemoteEnvSpec(endpoint=endpoint, run_token=False, **kw)
    except ConfigError as e:
        raise ControlError(grpc.StatusCode.INVALID_ARGUMENT, str(e).split(": ", 1)[-1]) from None
