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

The trainer's supervisor also calls ``disable`` (an unhealthy model leaves the
combined reward but stays listed), ``health`` and ``set_reward_actors``.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import re
import threading
from dataclasses import dataclass, field, replace

import grpc
import ray

from actors.reward.client import ProbeError
from actors.reward.models import RewardModelSpec
from actors.runtime.actors import create_reward_model_actor
from actors.serving import is_loopback, load_token
from actors.validation import ConfigError

log = logging.getLogger(__name__)

MAX_WEIGHT = 1e6
MAX_TIMEOUT_S = 600.0
MAX_ATTEMPTS = 10
MAX_FAILURE_THRESHOLD = 1000
MAX_COOLDOWN_S = 3600.0
MAX_TLS_CA_BYTES = 64 * 1024
MAX_TOKEN_CHARS = 4096
MAX_ENDPOINT_CHARS = 300
MAX_PATH_CHARS = 4096
PUSH_TIMEOUT_S = 60.0
INFO_TIMEOUT_S = 5.0
"""How long listing waits for the models' actors (together) before reporting them unhealthy."""
HEALTH_TIMEOUT_S = 2.0
"""How long ``health`` waits for the models' actors (together)."""
GRPC_SCHEMES = frozenset({"dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds", "google-c2p",
                          "google-c2p-experimental"})
"""gRPC resolver schemes: ``unix:1`` would be a socket file, not host ``unix`` port 1."""
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_DIGITS = re.compile(r"[0-9]{1,5}")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class ControlError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def one_line(text: str, limit: int = 300) -> str:
    """``text`` without ANSI codes or control characters, on one line, at most ``limit`` characters."""
    text = " ".join("".join(c if c.isprintable() else " " for c in _ANSI.sub("", str(text))).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# -- endpoints ----------------------------------------------------------------------------------
def _host_key(host: str) -> str:
    """The form hosts are compared in: an IP address compressed, a name lower-cased."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower()


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``host:port`` -> (host, port), the host in ``_host_key`` form (an IPv6 address
    without brackets); ControlError(INVALID_ARGUMENT) unless it is one (module docstring)."""
    bad = ControlError(grpc.StatusCode.INVALID_ARGUMENT,
                       f"endpoint {one_line(endpoint, 80)!r} is not host:port (a DNS name, an IPv4 address or "
                       "[an IPv6 address], port 1-65535, no scheme)")
    if len(endpoint) > MAX_ENDPOINT_CHARS:
        raise bad
    ip = None
    if endpoint.startswith("["):
        host, sep, port = endpoint[1:].partition("]:")
        if not sep or "%" in host:
            raise bad
        try:
            ip = ipaddress.IPv6Address(host)
        except ValueError:
            raise bad from None
    else:
        host, sep, port = endpoint.rpartition(":")
        labels = host.split(".")
        if not sep or not host or ":" in host:
            raise bad
        if re.fullmatch(r"[0-9]+", labels[-1]):  # a numeric last label: only a dotted-quad IPv4 address
            try:
                ip = ipaddress.IPv4Address(host)
            except ValueError:
                raise bad from None
        elif len(host) > 253 or host.lower() in GRPC_SCHEMES or not all(_LABEL.fullmatch(x) for x in labels):
            raise bad
    if not _DIGITS.fullmatch(port) or not 0 < int(port) < 65536:
        raise bad
    if ip is not None:
        for a in (ip, getattr(ip, "ipv4_mapped", None)):
            if a is not None and (a.is_link_local or a.is_unspecified or a.is_multicast):
                raise ControlError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"endpoint {endpoint!r}: link-local, unspecified and multicast addresses are "
                                   "refused")
    return _host_key(host), int(port)


def parse_allowed(entries: list[str]) -> list[tuple[str, int | None]]:
    """``control.allowed_reward_endpoints`` -> (host, port or None = any port); ConfigError if malformed."""
    out = []
    for entry in entries:
        e = str(entry).strip()
        try:
            if e.startswith("[") and "]:" in e or (":" in e and e.count(":") == 1):
                out.append(parse_endpoint(e))
                continue
            host = e[1:-1] if e.startswith("[") and e.endswith("]") else e
            out.append((parse_endpoint(f"[{host}]:1" if ":" in host else f"{host}:1")[0], None))
        except ControlError:
            raise ConfigError(f"control.allowed_reward_endpoints: {e!r} is not host or host:port") from None
    return out


def endpoint_allowed(endpoint: str, allowed: list[tuple[str, int | None]]) -> bool:
    host, port = parse_endpoint(endpoint)
    return any(host == h and p in (None, port) for h, p in allowed)


# -- validation ---------------------------------------------------------------------------------
def validate_spec(spec: RewardModelSpec) -> RewardModelSpec:
    """Check a spec's syntax and bounds before anything starts (nothing on disk or the
    network is looked at); raises ControlError(INVALID_ARGUMENT)."""
    bad = grpc.StatusCode.INVALID_ARGUMENT
    if not spec.name or len(spec.name) > 128 or not spec.name.isprintable() or any(c.isspace() for c in spec.name):
        raise ControlError(bad, f"name {one_line(spec.name, 140)!r}: 1-128 printable characters without spaces")
    if bool(spec.endpoint) == bool(spec.checkpoint_dir):
        raise ControlError(bad, "give exactly one target: endpoint (host:port) or checkpoint_dir")
    if spec.endpoint:
        parse_endpoint(spec.endpoint)
    if spec.checkpoint_dir and (len(spec.checkpoint_dir) > MAX_PATH_CHARS or "\0" in spec.checkpoint_dir
                                or not os.path.isabs(spec.checkpoint_dir)):
        raise ControlError(bad, "checkpoint_dir must be an absolute path on the trainer's host")
    if not (math.isfinite(spec.weight) and abs(spec.weight) <= MAX_WEIGHT):
        raise ControlError(bad, f"weight {spec.weight} must be finite and within +-{MAX_WEIGHT:g}")
    if not (math.isfinite(spec.timeout_s) and 0 < spec.timeout_s <= MAX_TIMEOUT_S):
        raise ControlError(bad, f"timeout_s {spec.timeout_s} must be in (0, {MAX_TIMEOUT_S:g}]")
    if spec.batch_size < 1:
        raise ControlError(bad, f"batch_size {spec.batch_size} must be >= 1")
    _validate_client(spec)
    return spec


def _validate_client(spec: RewardModelSpec) -> None:
    """The remote client's settings: TLS CA, token, retries and circuit breaker, each bounded."""
    bad = grpc.StatusCode.INVALID_ARGUMENT
    if spec.tls_ca is not None:
        if spec.checkpoint_dir:
            raise ControlError(bad, "tls_ca_pem is for an endpoint, not a checkpoint_dir")
        if len(spec.tls_ca) > MAX_TLS_CA_BYTES or b"-----BEGIN CERTIFICATE-----" not in spec.tls_ca:
            raise ControlError(bad, f"tls_ca_pem must be PEM certificate(s) of at most {MAX_TLS_CA_BYTES} bytes")
    if spec.token is not None:
        if spec.checkpoint_dir:
            raise ControlError(bad, "token is for an endpoint, not a checkpoint_dir")
        if not 0 < len(spec.token) <= MAX_TOKEN_CHARS or not all("!" <= c <= "~" for c in spec.token):
            raise ControlError(bad, f"token must be 1-{MAX_TOKEN_CHARS} printable ASCII characters without spaces")
    if not 1 <= spec.max_attempts <= MAX_ATTEMPTS:
        raise ControlError(bad, f"max_attempts {spec.max_attempts} must be in [1, {MAX_ATTEMPTS}]")
    if not 1 <= spec.failure_threshold <= MAX_FAILURE_THRESHOLD:
        raise ControlError(bad, f"failure_threshold {spec.failure_threshold} must be in [1, {MAX_FAILURE_THRESHOLD}]")
    if not (math.isfinite(spec.cooldown_s) and 0 < spec.cooldown_s <= MAX_COOLDOWN_S):
        raise ControlError(bad, f"cooldown_s {spec.cooldown_s} must be in (0, {MAX_COOLDOWN_S:g}]")


def resolve_checkpoint(path: str, roots: list[str]) -> str:
    """The realpath of ``path`` if it lies under one of ``roots`` (themselves realpath'd);
    else PERMISSION_DENIED, the same answer whether or not ``path`` exists."""
    denied = grpc.StatusCode.PERMISSION_DENIED
    if not roots:
        raise ControlError(denied, "local reward checkpoints cannot be registered over Control: "
                           "control.reward_checkpoint_roots is empty")
    outside = ControlError(denied, f"checkpoint_dir {one_line(path)!r} is not under control.reward_checkpoint_roots")
    try:
        real = os.path.realpath(path)
        for root in roots:
            r = os.path.realpath(root)
            if real == r or real.startswith(r.rstrip(os.sep) + os.sep):
                return real
    except (OSError, ValueError):
        pass
    raise outside


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
        lines = [x for x in _ANSI.sub("", str(getattr(e, "error_msg", e))).splitlines() if x.strip()]
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
                 reward_token_file: str | None = None):
        from learner.config import ControlConfig

        self.control = control if control is not None else ControlConfig()
        self.allowed = parse_allowed(self.control.allowed_reward_endpoints)
        self.reward_token_file = reward_token_file
        self.reward_actors = list(reward_actors)
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
