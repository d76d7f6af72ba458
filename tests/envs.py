"""Environments the tests name in ``env.name`` / ``env.key`` (``tests.envs:NAME``).

Real environments written for the tests (the ``Environment`` contract, no fleetrl
internals), kept free of torch imports like ``tests.rewards``: a rollout actor
imports this module when it builds one.
"""

import time

from actors.envs.base import Environment, StepResult


class Echo(Environment):
    """Answers each of the first ``turns - 1`` assistant turns with ``"seen N chars"`` (a
    message of ``role``); the episode ends after ``turns`` turns. Counts a ``tool_calls`` per reply.
    ``work_ms``: CPU time each step spends first (a non-trivial step, for benchmarks)."""

    def __init__(self, turns: int = 3, role: str = "tool", work_ms: float = 0.0):
        self.turns, self.role, self.work_ms = turns, role, work_ms

    def reset(self, prompt, metadata):
        return {"turn": 0, "chars": []}

    def step(self, state, completion):
        t0 = time.perf_counter()
        while (time.perf_counter() - t0) * 1e3 < self.work_ms:  # a step that costs CPU (benchmarks)
            pass
        state["turn"] += 1
        state["chars"].append(len(completion))
        if state["turn"] >= self.turns:
            return StepResult(done=True)
        return StepResult(observation=[{"role": self.role, "content": f"seen {len(completion)} chars"}],
                          info={"tool_calls": 1})

    def finish(self, state):
        return {"echo_turns": state["turn"], "echo_chars": sum(state["chars"])}


class Crashes(Echo):
    """Raises in ``step`` for prompts whose answer starts with an odd digit."""

    def step(self, state, completion):
        if int(state["answer"][0]) % 2:
            raise RuntimeError("the environment crashed")
        return super().step(state, completion)

    def reset(self, prompt, metadata):
        return {**super().reset(prompt, metadata), "answer": metadata["answer"]}


class Hangs(Echo):
    """``step`` sleeps 30 s for prompts whose answer starts with an odd digit."""

    def step(self, state, completion):
        if int(state["answer"][0]) % 2:
            time.sleep(30)
        return super().step(state, completion)

    def reset(self, prompt, metadata):
        return {**super().reset(prompt, metadata), "answer": metadata["answer"]}


class Garbage(Echo):
    """Returns a string from ``step`` instead of a ``StepResult``."""

    def step(self, state, completion):
        return "not a step result"
