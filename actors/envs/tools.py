"""``ToolEnvironment``: the policy calls tools by writing ``<NAME>ARGUMENT</NAME>``.

A turn that ends with a complete call (``</NAME>`` is a stop string, so the turn
ends right there) gets the tool's answer as an observation message,
``<result>...</result>`` or ``<error>...</error>``; a turn without a call is the
final answer and ends the episode. Built-in tools: ``calculator`` (``actors.envs
.calculator``: a parser, never ``eval``) and ``python`` (``actors.envs.sandbox``:
bubblewrap with CPU, wall, memory, output, process and file limits). The
per-turn counters (``tool_calls``, ``tool_errors``, ``malformed_calls``: an opened
tag never closed) go into the step's metrics, and ``finish`` hands them to the
verifier.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from actors.envs.base import EnvError, Environment, StepResult
from actors.envs.calculator import ToolError, calculate
from actors.envs.sandbox import SandboxLimits, SandboxPool
from actors.validation import require

MAX_OBSERVATION_CHARS = 2000


def _python_tool(limits: SandboxLimits) -> Callable[[str], str]:
    pool = SandboxPool(limits)  # sandboxes started ahead of the calls (from the first call on)

    def run(code: str) -> str:
        result = pool.run(code)
        if result.reason.startswith("sandbox_failed"):
            raise EnvError(f"the python tool's sandbox: {result.reason}")
        if not result.ok:
            raise ToolError(f"{result.reason}: {result.output[-500:]}".strip().rstrip(":"))
        return result.output

    return run


TOOL_FACTORIES: dict[str, Callable[[SandboxLimits], Callable[[str], str]]] = {
    "calculator": lambda _limits: calculate,
    "python": _python_tool,
}
"""Built-in tools by name -> a factory taking the sandbox limits, returning ``fn(argument) -> text``."""


@dataclass
class ToolState:
    metadata: dict[str, Any]
    tool_calls: int = 0
    tool_errors: int = 0
    malformed_calls: int = 0
    results: list[str] = field(default_factory=list)


class ToolEnvironment(Environment):
    """Tools ``tools`` (names of ``TOOL_FACTORIES``); observations as messages of ``role``."""

    def __init__(self, tools: list[str] = ("calculator",), role: str = "tool",
                 sandbox: SandboxLimits | None = None):
        tools = list(tools)
        unknown = sorted(set(tools) - set(TOOL_FACTORIES))
        require(bool(tools) and not unknown, "env.args.tools", f"unknown tools {unknown}; known: {sorted(TOOL_FACTORIES)}")
        self.role = role
        self.tools = {name: TOOL_FACTORIES[name](sandbox or SandboxLimits()) for name in tools}
        self.stop = tuple(f"</{name}>" for name in tools)
        names = "|".join(map(re.escape, tools))
        self.call = re.compile(rf"<({names})>(.*?)</\1>\s*$", re.S)
        self.opened = re.compile(rf"<({names})>")

    def reset(self, prompt: str, metadata: dict[str, Any]) -> ToolState:
        return ToolState(metadata=metadata)

    def step(self, state: ToolState, completion: str) -> StepResult:
        m = self.call.search(completion)
        if m is None:  # no call at the end of the turn: the final answer (maybe with a broken call)
            malformed = int(bool(self.opened.search(completion)))
            state.malformed_calls += malformed
            return StepResult(done=True, info={"tool_calls": 0, "tool_errors": 0, "malformed_calls": malformed})
        name, argument = m.group(1), m.group(2)
        state.tool_calls += 1
        try:
            text, error = f"<result>{self.tools[name](argument).strip()}</result>", 0
        except ToolError as e:
            text, error = f"<error>{e}</error>", 1
        state.tool_errors += error
        text = text if len(text) <= MAX_OBSERVATION_CHARS else text[:MAX_OBSERVATION_CHARS] + " [truncated]"
        state.results.append(text)
        return StepResult(observation=[{"role": self.role, "content": text}],
                          info={"tool_calls": 1, "tool_errors": error, "malformed_calls": 0})

    def finish(self, state: ToolState) -> dict[str, Any]:
        return {"tool_calls": state.tool_calls, "tool_errors": state.tool_errors,
                "malformed_calls": state.malformed_calls}
