"""Multi-turn episodes: the policy's turns, the environment's observations, one token stream.

``run_episodes`` drives ``n`` episodes per prompt through an ``Engine`` and the
prompts' environments (``actors.envs``): all prompts' first turns in one
generate call of ``n`` per prompt (prefix caching shares the prompt), then every
still-running episode's next turn, its whole history as the prompt (vLLM's prefix
cache holds the history computed in the turn before).

Token-exact: an episode's ids after the prompt are the policy's sampled ids and
the observation ids the chat template's *delta* renders (``ObservationIds``),
concatenated. Earlier turns are never re-tokenised, so what the learner trains
on is exactly what the policy generated and saw. ``loss_mask`` is 1 on the
policy's tokens (they carry behaviour log-probs) and 0 on observation tokens
(context only: no log-prob, no loss, no KL, no entropy).

Failures: an environment that raises ends its episode as excluded
(``env_error``); a ``step`` slower than ``env.step_timeout_s`` too (``env_timeout``:
its thread is left to finish on its own, the episode does not wait). Budgets end
an episode, not fail it: ``env.max_turns``, ``env.max_total_tokens`` and the
policy's context.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from actors.envs.base import EnvTimeout, StepResult
from actors.types import Excluded, Exclusion

STEP_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="env-step")
"""Environment calls run here, so a hanging one costs a thread, not the worker."""


@dataclass
class Episode:
    env: Any
    state: Any = None
    ids: list[int] = field(default_factory=list)
    """Everything after the prompt: policy turns and observations, in order."""
    mask: list[int] = field(default_factory=list)
    """1 = a policy token, 0 = an observation token."""
    logprobs: list[float] = field(default_factory=list)
    """Behaviour log-prob per token (0.0 for observation tokens)."""
    turns: int = 0
    last_turn: list[int] = field(default_factory=list)
    finished: bool = False
    """The episode ended on its own: the last turn ended with EOS, or the environment ended it
    after a turn that was not cut at the token limit."""
    cut: bool = False
    """The last turn was cut at the token limit (neither EOS nor a stop string)."""
    done: bool = False
    excluded: Excluded | None = None
    counters: Counter = field(default_factory=Counter)
    metadata: dict[str, Any] = field(default_factory=dict)
    """``env.finish``'s dict, for the reward functions."""

    @property
    def observation_tokens(self) -> int:
        return len(self.mask) - sum(self.mask)


class ObservationIds:
    """Token ids of observation messages that follow an assistant turn, rendered by the
    tokenizer's chat template: the text the template adds for ``messages`` after a
    conversation ending in an assistant message (plus what closes that message, minus
    the EOS the policy already wrote), tokenised on its own. Without a chat template the
    messages' contents go in as plain lines."""

    MARK = "\u2063fleetrl-assistant\u2063"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        eos = tokenizer.eos_token_id
        self.eos_text = tokenizer.decode([eos]) if eos is not None else ""
        if self.chat:
            head = self._render(self._base(), generation_prompt=False)
            self.closing = head[head.rindex(self.MARK) + len(self.MARK):]  # e.g. "<|im_end|>\n"

    def _base(self) -> list[dict]:
        return [{"role": "user", "content": "u"}, {"role": "assistant", "content": self.MARK}]

    def _render(self, messages: list[dict], *, generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def text(self, messages: list[dict], *, after_eos: bool) -> str:
        if not self.chat:
            return "".join(f"\n{m['content']}" for m in messages) + "\n"
        head = self._render(self._base(), generation_prompt=False)
        full = self._render(self._base() + messages, generation_prompt=True)
        if not full.startswith(head):
            raise ValueError("the chat template renders earlier turns differently once observations follow")
        glue = self.closing[len(self.eos_text):] if after_eos and self.closing.startswith(self.eos_text) \
            else self.closing
        return glue + full[len(head):]

    def __call__(self, messages: list[dict], *, after_eos: bool) -> list[int]:
        return self.tokenizer(self.text(messages, after_eos=after_eos), add_special_tokens=False)["input_ids"]


def turn_seed(seed: int, turn: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}:turn{turn}".encode(), digest_size=7).digest(), "big")


def run_episodes(engine, tokenizer, observation_ids: ObservationIds, envs: list[Any], prompts: list,
                 prompt_ids: list[list[int]], *, n: int, temperature: float, top_p: float, max_new_tokens: int,
                 seed: int, max_turns: int, max_total_tokens: int, step_timeout_s: float) -> list[list[Episode]]:
    """``n`` episodes per prompt (``[len(prompts)][n]``); ``envs[j]`` is prompt ``j``'s environment."""
    context = engine.context
    episodes = [[Episode(env=envs[j]) for _ in range(n)] for j in range(len(prompts))]
    for j, row in enumerate(episodes):
        for ep in row:
            _call(ep, Exclusion.ENV_ERROR, lambda: setattr(ep, "state", ep.env.reset(prompts[j].text,
                                                                                    dict(prompts[j].metadata))))
            ep.done = ep.excluded is not None
    budget = max_total_tokens or context
    turn = 0
    while True:
        live = [(j, ep) for j, row in enumerate(episodes) for ep in row if not ep.done]
        if not live:
            break
        for stop, batch in _by_stop(live).items():
            _generate_turn(engine, batch, prompt_ids, n=n if turn == 0 else 1, first=turn == 0,
                           temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=turn_seed(seed, turn),
                           stop=stop, budget=budget, context=context)
        for j, ep in live:
            _after_turn(ep, tokenizer, observation_ids, max_turns=max_turns, budget=budget,
                        room=context - len(prompt_ids[j]), step_timeout_s=step_timeout_s)
        turn += 1
    for row in episodes:
        for ep in row:
            if ep.excluded is None:
                _call(ep, Exclusion.ENV_ERROR, lambda: ep.metadata.update(ep.env.finish(ep.state) or {}))
    return episodes


def _by_stop(live: list[tuple[int, Episode]]) -> dict[tuple[str, ...], list[tuple[int, Episode]]]:
    """Episodes grouped by their environment's stop strings (one generate call per group)."""
    out: dict[tuple[str, ...], list] = {}
    for j, ep in live:
        out.setdefault(tuple(getattr(ep.env, "stop", ())), []).append((j, ep))
    return out


def _generate_turn(engine, batch, prompt_ids, *, n: int, first: bool, temperature: float, top_p: float,
                   max_new_tokens: int, seed: int, stop: tuple[str, ...], budget: int, context: int) -> None:
    if first:  # every episode of a prompt starts from the same ids: one prompt, n completions
        rows = sorted({j for j, _ in batch})
        limit = min(max_new_tokens, budget, *(context - len(prompt_ids[j]) for j in rows))
        outs = engine.generate([prompt_ids[j] for j in rows], n=n, temperature=temperature, top_p=top_p,
                               max_new_tokens=limit, seed=seed, stop=stop)
        by_row = {j: iter(out) for j, out in zip(rows, outs)}
        completions = [next(by_row[j]) for j, _ in batch]
    else:
        limit = min(max_new_tokens, *(min(budget - len(ep.ids), context - len(prompt_ids[j]) - len(ep.ids))
                                      for j, ep in batch))
        outs = engine.generate([prompt_ids[j] + ep.ids for j, ep in batch], n=1, temperature=temperature,
                               top_p=top_p, max_new_tokens=max(1, limit), seed=seed, stop=stop)
        completions = [out[0] for out in outs]
    for (_, ep), c in zip(batch, completions):
        ep.ids += c.ids
        ep.mask += [1] * len(c.ids)
        ep.logprobs += list(c.logprobs)
        ep.last_turn = list(c.ids)
        ep.finished, ep.cut = c.finished, not (c.finished or c.stopped)
        ep.turns += 1


def _after_turn(ep: Episode, tokenizer, observation_ids: ObservationIds, *, max_turns: int, budget: int, room: int,
                step_timeout_s: float) -> None:
    """The environment's answer to the turn just written; the episode ends here or gets its observation."""
    text = tokenizer.decode(ep.last_turn, skip_special_tokens=True)
    result = _call(ep, Exclusion.ENV_ERROR, lambda: ep.env.step(ep.state, text), timeout_s=step_timeout_s)
    if ep.excluded is not None:
        ep.done = True
        return
    if not isinstance(result, StepResult):
        ep.excluded = Excluded(Exclusion.ENV_ERROR, f"step returned {type(result).__name__}, not a StepResult")
        ep.done = True
        return
    ep.counters.update({k: v for k, v in result.info.items() if isinstance(v, (int, float))})
    if result.done or not result.observation:
        ep.finished = (ep.finished or result.done) and not ep.cut
        ep.done = True
        return
    if ep.turns >= max_turns:
        ep.done = True  # the turn budget ends it: unfinished
        return
    obs = observation_ids(result.observation, after_eos=ep.finished)  # did the turn end with EOS?
    if len(ep.ids) + len(obs) >= min(budget, room):
        ep.done = True  # no room for the observation and another turn
        return
    ep.ids += obs
    ep.mask += [0] * len(obs)
    ep.logprobs += [0.0] * len(obs)
    ep.finished = False


def _call(ep: Episode, kind: Exclusion, fn, timeout_s: float | None = None):
    """Run an environment call; an exception excludes the episode (``kind``), a timeout as
    ``env_timeout``."""
    if ep.excluded is not None:
        return None
    future = STEP_POOL.submit(fn)
    try:
        return future.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        ep.excluded = Excluded(Exclusion.ENV_TIMEOUT, f"{type(ep.env).__name__}.step took longer than {timeout_s}s")
    except EnvTimeout as e:  # a remote environment's deadline
        ep.excluded = Excluded(Exclusion.ENV_TIMEOUT, f"{type(ep.env).__name__}: {str(e)[:200]}")
    except Exception as e:  # noqa: BLE001 - environment code may raise anything
        ep.excluded = Excluded(kind, f"{type(ep.env).__name__}: {type(e).__name__}: {str(e)[:200]}")
    return None
