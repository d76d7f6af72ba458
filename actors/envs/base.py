"""What an environment is: ``reset``, ``step`` and a final hook, in plain Python.

An *episode* is one sample of a multi-turn rollout: the policy writes an assistant
turn, the environment answers with observation messages (a tool's result, a
user's reply), and so on until the environment says it is done or a budget ends
it. The rollout worker drives the loop (``actors.rollout.episodes``); an
environment only sees text:

* ``reset(prompt, metadata) -> state``: a fresh episode for one prompt (``metadata``
  is the prompt's: the dataset row's columns, e.g. ``answer``);
* ``step(state, completion) -> StepResult``: the assistant turn just written; the
  reply is observation messages (``{"role": ..., "content": ...}``, rendered with
  the policy's chat template) or none, and whether the episode is over;
* ``finish(state) -> dict``: once per episode, at its end: what the verifier
  should know about the whole episode. It is merged into the metadata the reward
  functions receive for this sample (e.g. ``tool_calls``), so a verifier can score
  the episode, not only its last turn.

``stop`` lists strings that end an assistant turn besides EOS (a tool call's
closing tag). An environment that raises ``EnvError`` (or anything else) ends the
episode as an excluded sample (``env_error``), never as a zero reward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class EnvError(RuntimeError):
    """An environment could not go on with an episode: the sample is excluded (``env_error``)."""


class EnvTimeout(EnvError):
    """An environment did not answer in time: the sample is excluded (``env_timeout``)."""


@dataclass
class StepResult:
    observation: list[dict[str, str]] | None = None
    """Messages to append for the policy's next turn (None or [] with ``done``)."""
    done: bool = False
    """The episode is over (the policy answered, or the environment ended it)."""
    info: dict[str, Any] = field(default_factory=dict)
    """Counters for this turn: ``tool_calls``, ``tool_errors`` (summed into the step's metrics)."""


class Environment:
    """Base class with the defaults; an environment may also be any object with these methods."""

    stop: tuple[str, ...] = ()
    """Strings that end an assistant turn besides EOS (kept in the turn's tokens)."""

    def reset(self, prompt: str, metadata: dict[str, Any]) -> Any:
        return {}

    def step(self, state: Any, completion: str) -> StepResult:
        return StepResult(done=True)

    def finish(self, state: Any) -> dict[str, Any]:
        return {}
