"""Run-time reward models of one training run: validate, authorize, register, remove, list, disable.

Plain logic on the driver side (the Control servicer calls it from gRPC
threads, so it is thread-safe). Registering a reward model starts a
``RewardModelActor`` for it, probes it, and hands the new model list to every
reward worker; the next batch they score includes it in the weighted sum.
Removing does the reverse. Errors are ``ControlError(status code, message)``,
each one line.

What a Control client may make the trainer do is bounded (issue 11):

* **Endpoints** are ``host:port``: a DNS name (RFC 1123 labels, not a gRPC
  resolver scheme such as ``unix`` or ``dns``), an IPv4 literal or a bracketed
  IPv6 literal (``[::1]:50051``); no spaces, slashes, ``@`` or zone ids; port
  1-65535. Link-local (169.254.0.0/16, fe80::/10, cloud metadata services),
  unspecified and multicast addresses are always refused (INVALID_ARGUMENT).
* **The run's reward token** ($FLEETRL_REWARD_TOKEN / $FLEETRL_REWARD_TOKEN_FILE)
  is only sent to endpoints in ``control.allowed_reward_endpoints`` (``host`` or
  ``host:port``, compared as written: names are not resolved). Any other
  endpoint needs its own token in the registration (``RewardModelSpec.token``,
  write-only, never echoed); without one it is refused with PERMISSION_DENIED.
  A token that would travel in plaintext (no ``tls_ca_pem``) to a host that is
  not loopback is *allowed* (the operator listed the endpoint or supplied the
  token, e.g. for a private network) but logged as a warning.
* **Checkpoints** (``checkpoint_dir``) must resolve (realpath, before anything
  else is looked at) under ``control.reward_checkpoint_roots``; empty = none can
  be registered over Control. Outside a root the answer is the same whether or
  not the path exists (PERMISSION_DENIED); inside, ``check_checkpoint`` looks
  only at the files transformers would load (FAILED_PRECONDITION).
* **Caps**: at most ``control.max_reward_models`` models, registered, disabled
  and being registered counted (RESOURCE_EXHAUSTED). A registration reserves its
  name under the lock, probes *outside* it with the deadline
  ``control.probe_timeout_s``, then commits under it: listing, status and other
  registrations never wait behind a probe.
* **Failures**: a model that is not usable (unreachable, wrong token, not a
  RewardModel server, checkpoint does not load, no answer in time) is
  FAILED_PRECONDITION with one clean line (no Ray traceback, no ANSI codes).

The checks themselves are ``rules.py``. The trainer's supervisor also calls ``disable`` (an unhealthy model leaves the
combined reward but stays listed), ``health`` and ``set_reward_actors``.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field, replace

import grpc
import ray

from actors.reward.models import RewardModelSpec
from actors.runtime.actors import create_reward_model_actor
from actors.serving import is_loopback, load_token
from actors.reward.client import ProbeError
from learner.control.rules import (ANSI, ControlError, endpoint_allowed, one_line, parse_allowed,  # noqa: F401
                                   parse_endpoint, resolve_checkpoint, validate_spec)

log = logging.getLogger(__name__)

PUSH_TIMEOUT_S = 60.0
INFO_TIMEOUT_S = 5.0
"""How long listing waits for the models' actors (together) before reporting them unhealthy."""
HEALTH_TIMEOUT_S = 2.0
"""How long ``health`` waits for the models' actors (together)."""


def probe_failure(name: str, e: Exception, timeout_s: float) -> ControlError:
    """The one-line ControlError for a registration probe that raised ``e``."""
    unusable = grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(e, ray.exceptions.GetTimeoutError):
        return ControlError(unusable, f"reward model {name!r} is not usable: no answer within "
                            f"control.probe_timeout_s={timeout_s:g}s")
    if isinstance(e, ray.exceptions.RayTaskError):
        cause = getattr(e, "cause", None)
        detail = str(cause) if isinstance(cause, ProbeError) else f"{type(cause).__name__}: {cause}"
        return ControlError(unusable, f"reward model {name!r} is not usable: {one_line(detail)}")
    if isinstance(e, ray.exceptions.RayActorError) and getattr(e, "actor_init_failed", False):
        # the model could not be built (a checkpoint that does not load): the cause's last line
        lines = [x for x in ANSI.sub("", str(getattr(e, "error_msg", e))).splitlines() if x.strip()]
        return ControlError(unusable, f"reward model {name!r} is not usable: {one_line(lines[-1] if lines else '')}")
    return ControlError(grpc.StatusCode.UNAVAILABLE,
                        f"cannot start reward model {name!r}: {type(e).__name__}: {one_line(str(e), 200)}")


@dataclass
class _Entry:
    spec: RewardModelSpec
    handle: object
    disabled: bool = False
    disabled_reason: str = ""
    stats: dict = field(default_factory=lambda: {"scored": 0, "failed": 0, "reward_mean": 0.0, "last_error": ""})


class RewardRegistry:
    """Run-time reward models of one training run (thread-safe: gRPC calls arrive on threads).

    ``control`` is the run's ``learner.config.ControlConfig`` (None: its defaults);
    ``reward_token_file`` overrides $FLEETRL_REWARD_TOKEN_FILE (read at each registration)."""

    def __init__(self, reward_actors: list, reserved_names: list[str] = (), control=None, *,
                 reward_token_file: str | None = None, coordinator=None):
        """``coordinator``: told whether models are enabled after each push (with
        ``reward.colocate`` the rollout workers then send their groups to the reward workers)."""
        from learner.config import ControlConfig

        self.control = control if control is not None else ControlConfig()
        self.allowed = parse_allowed(self.control.allowed_reward_endpoints)
        self.reward_token_file = reward_token_file
        self.reward_actors = list(reward_actors)
        self.coordinator = coordinator
        self.reserved = set(reserved_names)
        self.models: dict[str, _Entry] = {}
        self.pending: set[str] = set()
        self.closed = False
        self.lock = threading.Lock()  # held only briefly: never while probing or pushing
        self._push_lock = threading.Lock()  # pushes one at a time, each with the then-current list

    # -- reward workers -------------------------------------------------------------------------
    def _push(self) -> None:
        """Hand the enabled models to every reward worker (they apply it at their next batch)."""
        with self._push_lock:
            with self.lock:
                actors = list(self.reward_actors)
                models = [(n, e.spec.weight, e.handle, e.spec.timeout_s * e.spec.max_attempts, e.spec.batch_size)
                          for n, e in self.models.items() if not e.disabled]
            ray.get([a.set_models.remote(models) for a in actors], timeout=PUSH_TIMEOUT_S)
            if self.coordinator is not None:  # after the workers hold the models: groups may go to them now
                ray.get(self.coordinator.set_models_registered.remote(bool(models)), timeout=PUSH_TIMEOUT_S)

    def set_reward_actors(self, actors: list) -> None:
        """The reward workers changed (a dead one was replaced): push the current models to
        all of them; ControlError(UNAVAILABLE) if they do not confirm."""
        with self.lock:
            self.reward_actors = list(actors)
        try:
            self._push()
        except Exception as e:  # noqa: BLE001
            raise ControlError(grpc.StatusCode.UNAVAILABLE, f"reward workers did not take the reward models: "
                               f"{one_line(str(e), 200)}") from None

    # -- registration ---------------------------------------------------------------------------
    def _authorize(self, spec: RewardModelSpec) -> RewardModelSpec:
        """The spec to start: the token it may use, or the checkpoint's realpath; PERMISSION_DENIED otherwise."""
        if spec.checkpoint_dir:
            return replace(spec, checkpoint_dir=resolve_checkpoint(spec.checkpoint_dir,
                                                                   self.control.reward_checkpoint_roots))
        token = spec.token
        if token is None:
            if not endpoint_allowed(spec.endpoint, self.allowed):
                raise ControlError(grpc.StatusCode.PERMISSION_DENIED,
                                   f"endpoint {spec.endpoint!r} is not in control.allowed_reward_endpoints: the run's "
                                   "reward token is only sent there; allow it, or register it with its own token "
                                   "(reward add --reward-token-file FILE)")
            try:
                token = load_token(self.reward_token_file or os.environ.get("FLEETRL_REWARD_TOKEN_FILE"),
                                   env="FLEETRL_REWARD_TOKEN")
            except (OSError, ValueError) as e:
                raise ControlError(grpc.StatusCode.FAILED_PRECONDITION, f"reward token file: {one_line(e)}") from None
        host = parse_endpoint(spec.endpoint)[0]
        if token and spec.tls_ca is None and not is_loopback(host):
            log.warning("reward model %s: its bearer token goes to %s in plaintext (no tls_ca_pem)", spec.name,
                        spec.endpoint)
        return replace(spec, token=token)

    def register(self, spec: RewardModelSpec) -> dict:
        """Validate, authorize, reserve the name, probe (outside the lock), commit, push."""
        validate_spec(spec)
        spec = self._authorize(spec)
        if spec.checkpoint_dir:
            from actors.reward.hf import check_checkpoint

            try:
                check_checkpoint(spec.checkpoint_dir)
            except ValueError as e:
                raise ControlError(grpc.StatusCode.FAILED_PRECONDITION, one_line(e)) from None
        self._reserve(spec.name)
        try:
            handle = create_reward_model_actor(spec)
            try:  # the server answers GetMetadata with the token / the checkpoint loads and scores
                ray.get(handle.probe.remote(), timeout=self.control.probe_timeout_s)
            except Exception as e:  # noqa: BLE001 - every failure becomes one clean line
                ray.kill(handle)
                raise probe_failure(spec.name, e, self.control.probe_timeout_s) from None
            entry = self._commit(spec, handle)
        finally:
            with self.lock:
                self.pending.discard(spec.name)
        try:
            self._push()
        except Exception as e:  # noqa: BLE001 - roll back: the model is not registered
            with self.lock:
                if self.models.get(spec.name) is entry:
                    del self.models[spec.name]
            ray.kill(handle)
            try:
                self._push()
            except Exception:  # noqa: BLE001 - the first failure is the one reported
                pass
            raise ControlError(grpc.StatusCode.UNAVAILABLE, f"reward workers did not take {spec.name!r}: "
                               f"{one_line(str(e), 200)}") from None
        log.info("reward model %s registered (%s, weight %s)", spec.name, spec.endpoint or spec.checkpoint_dir,
                 spec.weight)
        return self.info(spec.name)

    def _reserve(self, name: str) -> None:
        with self.lock:
            if self.closed:
                raise ControlError(grpc.StatusCode.UNAVAILABLE, "the run is shutting down")
            old = self.models.get(name)
            if name in self.reserved or name in self.pending or (old is not None and not old.disabled):
                raise ControlError(grpc.StatusCode.ALREADY_EXISTS, f"reward model {name!r} already exists")
            count = len(self.models) + len(self.pending) - (old is not None)
            if count >= self.control.max_reward_models:
                raise ControlError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"control.max_reward_models={self.control.max_reward_models}: {count} reward "
                                   "models are registered or being registered; remove one first")
            self.pending.add(name)

    def _commit(self, spec: RewardModelSpec, handle) -> _Entry:
        with self.lock:
            if self.closed:
                ray.kill(handle)
                raise ControlError(grpc.StatusCode.UNAVAILABLE, "the run is shutting down")
            entry = self.models[spec.name] = _Entry(spec, handle)  # replaces a disabled entry of that name
            return entry

    def remove(self, name: str) -> None:
        with self.lock:
            if name not in self.models:
                raise ControlError(grpc.StatusCode.NOT_FOUND, f"no reward model named {name!r}")
            entry = self.models.pop(name)
        ray.kill(entry.handle)  # first: a reward worker waiting on it is released now
        try:
            self._push()
        except Exception as e:  # noqa: BLE001 - its calls already fail fast; report the push failure
            raise ControlError(grpc.StatusCode.UNAVAILABLE, f"{name!r} removed, but reward workers did "
                               f"not confirm: {one_line(str(e), 200)}") from None
        log.info("reward model %s removed", name)

    # -- the supervisor's calls -----------------------------------------------------------------
    def disable(self, name: str, reason: str) -> None:
        """Take ``name`` out of every reward worker and kill its actor; it stays listed with
        ``disabled`` and ``reason`` until registered again or removed. NOT_FOUND if unknown;
        a push the workers do not confirm is logged (the dead actor already fails fast)."""
        with self.lock:
            entry = self.models.get(name)
            if entry is None:
                raise ControlError(grpc.StatusCode.NOT_FOUND, f"no reward model named {name!r}")
            if entry.disabled:
                return
            entry.disabled, entry.disabled_reason = True, one_line(reason)
        ray.kill(entry.handle)
        try:
            self._push()
        except Exception as e:  # noqa: BLE001
            log.warning("reward model %s disabled, but reward workers did not confirm: %s", name, one_line(str(e)))
        log.warning("reward model %s disabled: %s", name, entry.disabled_reason)

    def enabled_specs(self) -> list:
        """The specs of the enabled models (a restarted run registers them again)."""
        with self.lock:
            return [e.spec for e in self.models.values() if not e.disabled]

    def health(self) -> dict[str, bool]:
        """For each enabled model: does its actor answer ``info()`` within HEALTH_TIMEOUT_S
        with a closed circuit? (The lock is not held while waiting.)"""
        with self.lock:
            entries = {n: e for n, e in self.models.items() if not e.disabled}
        health = {n: bool(s is not None and s["healthy"]) for n, s in self._stats(entries, HEALTH_TIMEOUT_S).items()}
        for n, ok in health.items():
            if not ok:  # rollout is paused: no traffic would ever close the circuit; ask for the trial
                try:
                    entries[n].handle.trial.remote()
                except Exception:  # noqa: BLE001 - a handle that cannot take calls (dead actor)
                    pass
        return health

    # -- listing --------------------------------------------------------------------------------
    def _stats(self, entries: dict[str, _Entry], timeout_s: float) -> dict[str, dict | None]:
        """Each entry's ``info()``, asked all at once; None for one that failed or did not answer in time."""
        refs = {}
        for n, e in entries.items():
            try:
                refs[n] = e.handle.info.remote()
            except Exception:  # noqa: BLE001 - a handle that cannot take calls
                refs[n] = None
        live = [r for r in refs.values() if r is not None]
        ready = set(ray.wait(live, num_returns=len(live), timeout=timeout_s)[0]) if live else set()
        out = {}
        for n, r in refs.items():
            out[n] = None
            if r is not None and r in ready:
                try:
                    out[n] = ray.get(r, timeout=0)
                except Exception:  # noqa: BLE001 - a dead actor
                    pass
        return out

    def _infos(self, names: list[str] | None = None) -> list[dict]:
        with self.lock:
            entries = {n: e for n, e in self.models.items() if names is None or n in names}
        stats = self._stats({n: e for n, e in entries.items() if not e.disabled}, INFO_TIMEOUT_S)
        out = []
        for n, e in entries.items():
            s = stats.get(n)
            if s is not None:
                e.stats = {k: s[k] for k in ("scored", "failed", "reward_mean", "last_error")}
            healthy = bool(s and s["healthy"])
            last_error = e.stats["last_error"] if s is not None or e.disabled else \
                f"its actor did not answer within {INFO_TIMEOUT_S:g}s"
            out.append({"spec": e.spec, **e.stats, "healthy": healthy, "last_error": last_error,
                        "disabled": e.disabled, "disabled_reason": e.disabled_reason})
        return out

    def info(self, name: str) -> dict:
        found = self._infos([name])
        if not found:
            raise ControlError(grpc.StatusCode.NOT_FOUND, f"no reward model named {name!r}")
        return found[0]

    def list(self) -> list[dict]:
        return self._infos()

    def close(self) -> None:
        with self.lock:
            self.closed = True
            entries = list(self.models.values())
            self.models.clear()
        for e in entries:
            ray.kill(e.handle)
