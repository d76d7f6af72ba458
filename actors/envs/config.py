"""The ``env`` section and how an environment is built from a name."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

from actors.envs.base import Environment
from actors.envs.sandbox import SandboxLimits
from actors.envs.tools import ToolEnvironment
from actors.validation import ConfigError, require

REMOTE = "grpc://"
"""``env.name`` prefix of an environment served over gRPC (``fleetrl env serve``)."""

BUILTIN_ENVS = {
    "tools": lambda sandbox, **args: ToolEnvironment(sandbox=sandbox, **args),
    "calculator": lambda sandbox, **args: ToolEnvironment(tools=["calculator"], sandbox=sandbox, **args),
    "python": lambda sandbox, **args: ToolEnvironment(tools=["python"], sandbox=sandbox, **args),
}
"""Built-in environments: ``tools`` (``args.tools``: a list of tool names), and ``calculator`` /
``python``, a ``ToolEnvironment`` with that one tool."""


@dataclass(kw_only=True)
class EnvConfig:
    name: str = ""
    """The environment of every prompt: empty = single-turn (one completion per sample), a built-in
    (``calculator``, ``python``, ``tools``), ``module:Class``, or ``grpc://HOST:PORT`` (a server of
    ``fleetrl env serve``; ``env.args`` then sets ``timeout_s``, ``max_attempts``, ``failure_threshold``,
    ``cooldown_s``, ``token_file``). A built-in task that needs one sets it
    (``task.name: multiply`` uses ``calculator``)."""
    args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments of that environment's constructor (``tools``: ``{tools: [calculator, python],
    role: tool}``)."""
    key: str = ""
    """A prompt metadata column (a dataset column) naming each row's environment (a built-in or
    ``module:Class``, built without arguments); rows where it is empty use ``env.name``. A name that
    cannot be built excludes the row's samples (``env_unknown``)."""
    max_turns: int = 4
    """Assistant turns per episode at most; the episode ends after the last one."""
    max_total_tokens: int = 0
    """Tokens per episode after the prompt (policy turns + observations) at most; 0 = the policy's context."""
    step_timeout_s: float = 30.0
    """An environment's ``step`` slower than this ends the episode as excluded (``env_timeout``)."""
    sandbox: SandboxLimits = field(default_factory=SandboxLimits)
    """Limits of the ``python`` tool's bubblewrap sandbox."""

    def __post_init__(self):
        require(self.max_turns >= 1, "env.max_turns", "must be >= 1")
        require(self.max_total_tokens >= 0, "env.max_total_tokens", "must be >= 0 (0 = the policy's context)")
        require(self.step_timeout_s > 0, "env.step_timeout_s", "must be > 0")
        require(not self.args or bool(self.name), "env.args", "needs env.name")
        if self.name and not self.name.startswith(REMOTE):
            make_env(self.name, self.args, self.sandbox)  # a bad name or argument fails at config time

    @property
    def enabled(self) -> bool:
        return bool(self.name or self.key)


def make_env(name: str, args: dict[str, Any] | None = None, sandbox: SandboxLimits | None = None) -> Environment:
    """Environment ``name`` (built-in, ``module:Class``, or ``grpc://HOST:PORT`` for a server of
    ``fleetrl env serve``, ``args`` then being ``RemoteEnvSpec`` fields) built with ``args``;
    ConfigError naming ``env.name`` if it cannot be (``EnvError`` if a server does not answer)."""
    args = dict(args or {})
    if name.startswith(REMOTE):
        from actors.envs.remote import RemoteEnvironment, RemoteEnvSpec

        try:
            spec = RemoteEnvSpec(endpoint=name[len(REMOTE):], **args)
        except TypeError as e:
            raise ConfigError(f"env.args: {name}: {e}") from None
        return RemoteEnvironment(spec)
    if name in BUILTIN_ENVS:
        try:
            return BUILTIN_ENVS[name](sandbox or SandboxLimits(), **args)
        except TypeError as e:
            raise ConfigError(f"env.args: {name}: {e}") from None
    module, _, attr = name.partition(":")
    if not module or not attr:
        raise ConfigError(f"env.name: {name!r} is neither a built-in ({', '.join(sorted(BUILTIN_ENVS))}) "
                          f"nor module:Class")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"env.name: cannot load {name!r}: {type(e).__name__}: {e}") from None
    try:
        env = cls(**args)
    except Exception as e:  # noqa: BLE001 - user code may raise anything; one line naming the key
        raise ConfigError(f"env.name: {name!r}({args}) raised {type(e).__name__}: {e}") from None
    missing = [m for m in ("reset", "step") if not callable(getattr(env, m, None))]
    require(not missing, "env.name", f"{name!r} has no {' / '.join(missing)} method")
    return env
