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
(``env_error``); a ``reset``, ``step`` or ``finish`` slower than ``env.step_timeout_s``
too (``env_timeout``: its thread is left to finish on its own, the episode does not
wait). The calls of one turn run concurrently. Budgets end an episode, not fail it:
``env.max_turns``, ``env.max_total_tokens`` and the policy's context, each
episode's own (episodes with different room generate in different calls). Every
episode that was reset gets ``finish`` at the end, excluded ones too (their result
ignored), so an environment can release what it holds.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from actors.envs.base import EnvTimeout, StepResult
from actors.types import Excluded, Exclusion

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
    """``n`` episodes per prompt (``[len(prompts)][n]``); ``envs[j]`` is prompt ``j``'s environment.
    Every environment call (``reset``, ``step``, ``finish``) of a turn runs concurrently, each on
    a thread of its own, within ``step_timeout_s``."""
    context = engine.context
    episodes = [[Episode(env=envs[j]) for _ in range(n)] for j in range(len(prompts))]
    flat = [(j, ep) for j, row in enumerate(episodes) for ep in row]
    for (j, ep), state in zip(flat, env_calls(flat, lambda k, j, ep: ep.env.reset(prompts[j].text,
                                                                                 dict(prompts[j].metadata)),
                                              step_timeout_s)):
        ep.state = state
        ep.done = ep.excluded is not None
    budget = max_total_tokens or context
    turn = 0
    while True:
        live = [(j, ep) for j, ep in flat if not ep.done]
        if not live:
            break
        for (stop, limit), batch in _by_call(live, prompt_ids, max_new_tokens=max_new_tokens, budget=budget,
                                             context=context).items():
            _generate_turn(engine, batch, prompt_ids, n=n if turn == 0 else 1, first=turn == 0,
                           temperature=temperature, top_p=top_p, max_new_tokens=limit, seed=turn_seed(seed, turn),
                           stop=stop)
        texts = [tokenizer.decode(ep.last_turn, skip_special_tokens=True) for _, ep in live]
        results = env_calls(live, lambda k, j, ep: ep.env.step(ep.state, texts[k]), step_timeout_s)
        for (j, ep), result in zip(live, results):
            _after_turn(ep, result, observation_ids, max_turns=max_turns, budget=budget, room=context - len(prompt_ids[j]))
        turn += 1
    done = [(j, ep) for j, ep in flat if ep.state is not None]
    for (_, ep), meta in zip(done, env_calls(done, lambda k, j, ep: ep.env.finish(ep.state), step_timeout_s,
                                             closing=True)):
        if ep.excluded is None and meta is not None:  # an excluded episode is closed too: its resources go
            if not isinstance(meta, dict):
                ep.excluded = Excluded(Exclusion.ENV_ERROR, f"finish returned {type(meta).__name__}, not a dict")
            else:
                ep.metadata.update(meta)
    return episodes


def env_calls(items: list[tuple[int, Episode]], fn, timeout_s: float, *, closing: bool = False) -> list:
    """``fn(k, j, ep)`` for every ``k``-th item at once, each on a daemon thread of its own, all
    within ``timeout_s``: the results in order (None for an episode excluded here). An exception
    excludes its episode (``env_error``; ``env_timeout`` for ``EnvTimeout``), and so does a call
    still running at the deadline (``env_timeout``): its thread is left to finish on its own, so
    a hanging environment costs a thread, never the worker. Already excluded episodes are
    skipped, except when ``closing`` (``finish``: their outcome is ignored)."""
    results: list = [None] * len(items)
    errors: list = [None] * len(items)

    def run(k: int, j: int, ep: Episode) -> None:
        try:
            results[k] = fn(k, j, ep)
        except BaseException as e:  # noqa: BLE001 - environment code may raise anything
            errors[k] = e

    threads = []
    for k, (j, ep) in enumerate(items):
        if ep.excluded is not None and not closing:
            threads.append(None)
            continue
        t = threading.Thread(target=run, args=(k, j, ep), name="env-call", daemon=True)
        t.start()
        threads.append(t)
    deadline = time.monotonic() + timeout_s
    for k, ((_, ep), t) in enumerate(zip(items, threads)):
        if t is None:
            continue
        t.join(max(0.0, deadline - time.monotonic()))
        name = type(ep.env).__name__
        if ep.excluded is not None:  # closing an excluded episode: whatever happens is ignored
            results[k] = None
        elif t.is_alive():
            ep.excluded = Excluded(Exclusion.ENV_TIMEOUT, f"{name} took longer than env.step_timeout_s={timeout_s:g}s")
        elif isinstance(errors[k], EnvTimeout):
            ep.excluded = Excluded(Exclusion.ENV_TIMEOUT, f"{name}: {str(errors[k])[:200]}")
        elif errors[k] is not None:
            ep.excluded = Excluded(Exclusion.ENV_ERROR, f"{name}: {type(errors[k]).__name__}: {str(errors[k])[:200]}")
        if ep.excluded is not None:
            results[k] = None
    return results


def _by_call(live: list[tuple[int, Episode]], prompt_ids, *, max_new_tokens: int, budget: int, context: int) -> dict[tuple[tuple[str, ...], int], list[tuple[int, Episode]]]:
    """Episodes grouped by (their environment's stop strings, their own token limit for this turn):
    one generate call per group, so no episode's room limits another's turn."""
    out: dict[tuple, list] = {}
    for j, ep in live:
        limit = min(max_new_tokens, budget - len(ep.ids), context - len(prompt_ids[j]) - len(ep.ids))
        out.setdefault((tuple(getattr(ep.env, "stop", ())), max(1, limit)), []).append((j, ep))
    return out


def _generate_turn(engine, batch, prompt_ids, *, n: int, first: bool, temperature: float, top_p: float,
                   max_new_tokens: int, seed: int, stop: tuple[str, ...]) -> None:
    if first:  # every episode of a prompt starts from the same ids: one prompt, n completions
        rows = sorted({j for j, _ in batch})
        outs = engine.generate([prompt_ids[j] for j in rows], n=n, temperature=temperature, top_p=top_p,
                               max_new_tokens=max_new_tokens, seed=seed, stop=stop)
        by_row = {j: iter(out) for j, out in zip(rows, outs)}
        completions = [next(by_row[j]) for j, _ in batch]
    else:
        outs = engine.generate([prompt_ids[j] + ep.ids for j, ep in batch], n=1, temperature=temperature,
                               top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, stop=stop)
        completions = [out[0] for out in outs]
    for (_, ep), c in zip(batch, completions):
        ep.ids += c.ids
        ep.mask += [1] * len(c.ids)
        ep.logprobs += list(c.logprobs)
        ep.last_turn = list(c.ids)
        ep.finished, ep.cut = c.finished, not (c.finished or c.stopped)
        ep.turns += 1


def _after_turn(ep: Episode, result, observation_ids: ObservationIds, *, max_turns: int, budget: int,
                room: int) -> None:
    """The environment's answer to the turn just written: the episode ends here or gets its observation."""
    if ep.excluded is not None:
        ep.done = True
        return
    if not isinstance(result, StepResult):
        ep.excluded = Excluded(Exclusion.ENV_ERROR, f"step returned {type(result).__name__}, not a StepResult")
        ep.done = True
        return
    ep.counters.update({k: v for k, v in result.info.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
    if result.done or not result.observation:
        ep.finished = (ep.finished or result.done) and not ep.cut
        ep.done = True
        return
    if ep.turns >= max_turns:  # the turn budget ends it, an observation still pending: unfinished
        ep.finished, ep.done = False, True
        return
    obs = observation_ids(result.observation, after_eos=ep.finished)  # did the turn end with EOS?
    if len(ep.ids) + len(obs) >= min(budget, room):  # no room for the observation and another turn
        ep.finished, ep.done = False, True
        return
    ep.ids += obs
    ep.mask += [0] * len(obs)
    ep.logprobs += [0.0] * len(obs)
    ep.finished = False
