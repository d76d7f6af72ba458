"""What a Control client may ask for: the rules a reward-model registration is checked against.

Pure functions and constants (no Ray, no registry state), used by
``registry.RewardRegistry``: endpoint syntax and the allow-list, spec bounds,
and checkpoint roots. The
policy they implement is written in ``registry.py``'s docstring.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re

import grpc

from actors.reward.models import RewardModelSpec
from actors.validation import ConfigError

MAX_WEIGHT = 1e6
MAX_TIMEOUT_S = 600.0
MAX_ATTEMPTS = 10
MAX_FAILURE_THRESHOLD = 1000
MAX_COOLDOWN_S = 3600.0
MAX_TLS_CA_BYTES = 64 * 1024
MAX_TOKEN_CHARS = 4096
MAX_ENDPOINT_CHARS = 300
MAX_PATH_CHARS = 4096
GRPC_SCHEMES = frozenset({"dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds", "google-c2p",
                          "google-c2p-experimental"})
"""gRPC resolver schemes: ``unix:1`` would be a socket file, not host ``unix`` port 1."""
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_DIGITS = re.compile(r"[0-9]{1,5}")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class ControlError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def one_line(text: str, limit: int = 300) -> str:
    """``text`` without ANSI codes or control characters, on one line, at most ``limit`` characters."""
    text = " ".join("".join(c if c.isprintable() else " " for c in ANSI.sub("", str(text))).split())
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
