"""Held-out evaluation as the papers report it, run by the rollout workers with their engine.

A rollout worker completes each held-out prompt greedily (``greedy accuracy``)
and, with ``eval.num_samples: n``, ``n`` times at ``eval.temperature``; one
verifier (``eval.reward``) scores every completion and a score of at least
``eval.correct_threshold`` counts as correct. From ``c`` correct of ``n``
samples a prompt's ``pass@k`` is the unbiased estimator
``1 - C(n - c, k) / C(n, k)`` (Chen et al., 2021) and its ``mean@n`` is
``c / n``; the reported value is the mean over prompts, overall and per data
source (``data.source_key``). A completion the verifier could not score (an
``Excluded``, e.g. a verification timeout) is not correct, and counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from actors.validation import require


@dataclass(kw_only=True)
class EvalConfig:
    greedy: bool = True
    """Greedy completions of every held-out prompt: greedy_accuracy (eval_before/eval_after in summary.json)."""
    num_samples: int = 0
    """Sampled completions per held-out prompt for pass@k and mean@n (0 = greedy only)."""
    k: list[int] = field(default_factory=lambda: [1])
    """pass@k is reported for each k here that is <= num_samples (and k = num_samples)."""
    temperature: float = 1.0
    """Sampling temperature of the num_samples completions."""
    reward: str = ""
    """Verifier that decides correctness (a reward.functions name, with its reward.function_args); empty = the
    built-in task's verifier, or the first of reward.functions."""
    correct_threshold: float = 1.0
    """A completion is correct when the verifier's score is at least this."""
    max_new_tokens: int = 0
    """Completion length cap for evaluation; 0 = the one training uses."""

    def __post_init__(self):
        require(self.greedy or self.num_samples > 0, "eval.greedy", "false needs eval.num_samples > 0")
        require(self.num_samples >= 0, "eval.num_samples", "must be >= 0")
        require(all(k >= 1 for k in self.k), "eval.k", f"every k must be >= 1, got {self.k}")
        require(self.temperature > 0, "eval.temperature", "must be > 0 (greedy is eval.greedy)")
        require(self.max_new_tokens >= 0, "eval.max_new_tokens", "must be >= 0")

    def ks(self) -> list[int]:
        """The k of every pass@k reported."""
        return sorted({k for k in self.k if k <= self.num_samples} | ({self.num_samples} - {0}))


def is_headline(metric: str) -> bool:
    """The accuracy metrics of an evaluation (greedy_accuracy, pass@k, mean@n), not its counts."""
    return metric == "greedy_accuracy" or metric.startswith(("pass@", "mean@"))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with ``c`` correct of ``n`` samples (``k <= n``)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass
class PromptResult:
    """One held-out prompt's outcome on a rollout worker."""

    uid: int
    source: str
    greedy: float | None = None
    """1.0/0.0: the greedy completion was correct (None: not evaluated greedily)."""
    correct: int = 0
    """Sampled completions that were correct."""
    samples: int = 0
    excluded: int = 0
    """Completions the verifier could not score."""
    response_chars: float = 0.0
    """Mean length of this prompt's completions (characters)."""


def summarize(results: list[PromptResult], ks: list[int]) -> dict:
    """Mean metrics over ``results``: greedy_accuracy, pass@k, mean@n, excluded, prompts."""
    out: dict = {"prompts": len(results), "excluded": sum(r.excluded for r in results)}
    greedy = [r.greedy for r in results if r.greedy is not None]
    if greedy:
        out["greedy_accuracy"] = sum(greedy) / len(greedy)
    sampled = [r for r in results if r.samples]
    if sampled:
        n = min(r.samples for r in sampled)
        out[f"mean@{n}"] = sum(r.correct / r.samples for r in sampled) / len(sampled)
        for k in ks:
            if k <= n:
                out[f"pass@{k}"] = sum(pass_at_k(r.samples, r.correct, k) for r in sampled) / len(sampled)
    if results:
        out["response_chars"] = sum(r.response_chars for r in results) / len(results)
    return out


def eval_metrics(results: list[PromptResult], ks: list[int]) -> dict:
    """``summarize`` overall, plus ``by_source`` when the prompts come from more than one source."""
    out = summarize(results, ks)
    sources = sorted({r.source for r in results})
    if len(sources) > 1 or (sources and sources[0]):
        out["by_source"] = {s: summarize([r for r in results if r.source == s], ks) for s in sources}
    return out


def score_prompt(uid: int, source: str, greedy, sampled: list, verify, threshold: float, metadata: dict,
                 prompt: str) -> PromptResult:
    """Score one prompt's samples (``actors.types.Sample``: ``greedy`` or None, and ``sampled``)
    with ``verify`` (a reward function) into a ``PromptResult``. A sample scores its
    ``scored_text`` (an episode's last turn) with the prompt's metadata updated by its own;
    an excluded sample (its episode's environment failed) is not correct, and counted."""
    samples = ([greedy] if greedy is not None else []) + list(sampled)
    texts = [s.completion_text if s.scored_text is None else s.scored_text for s in samples]
    meta = [{**metadata, **s.metadata} for s in samples]
    keys = sorted({k for m in meta for k in m})
    try:
        scores = list(verify([prompt] * len(texts), texts, **{k: [m.get(k) for m in meta] for k in keys}))
    except Exception:  # noqa: BLE001 - a user verifier may raise anything: none of these is correct
        scores = [None] * len(texts)
    if len(scores) != len(texts):
        scores = [None] * len(texts)
    scores = [None if s.excluded is not None else score for s, score in zip(samples, scores)]
    ok = [isinstance(s, (int, float)) and math.isfinite(s) and s >= threshold for s in scores]
    bad = sum(not isinstance(s, (int, float)) or not math.isfinite(s) for s in scores)
    r = PromptResult(uid=uid, source=source, excluded=bad, samples=len(sampled),
                     response_chars=sum(map(len, texts)) / max(1, len(texts)))
    if greedy is not None:
        r.greedy = 1.0 if ok[0] else 0.0
        ok = ok[1:]
    r.correct = sum(ok)
    return r


def evaluate_prompts(worker, prompts: list, cfg: EvalConfig, *, verify, source_key: str, max_new_tokens: int,
                     seed: int = 0, batch_prompts: int = 16) -> list[PromptResult]:
    """Complete and score ``prompts`` (``Prompt``) with ``worker``'s engine and current weights.
    The worker's lock is held per chunk of ``batch_prompts``, so the streaming loop generates
    between chunks (the weights do not change meanwhile: the driver publishes none while it
    waits for the evaluation)."""
    out = []
    for i in range(0, len(prompts), batch_prompts):
        with worker.lock:
            out += _evaluate_chunk(worker, prompts[i : i + batch_prompts], cfg, verify=verify, source_key=source_key,
                                   max_new_tokens=max_new_tokens, seed=seed)
    return out


def _evaluate_chunk(worker, chunk: list, cfg: EvalConfig, *, verify, source_key: str, max_new_tokens: int,
                    seed: int) -> list[PromptResult]:
    """Greedy and sampled completions (episodes, with environments) of ``chunk`` through the
    worker's own sampling path (``RolloutWorker.complete``), scored by ``verify``."""
    out = []
    ids = [worker.tokenizer(p.text)["input_ids"] for p in chunk]
    version = worker.policy_version
    greedy = [None] * len(chunk)
    if cfg.greedy:
        rows = worker.complete(chunk, ids, n=1, temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens,
                               seed=seed, version=version)
        greedy = [row[0] for row in rows]
    sampled = [[] for _ in chunk]
    if cfg.num_samples:
        sampled = worker.complete(chunk, ids, n=cfg.num_samples, temperature=cfg.temperature, top_p=1.0,
                                  max_new_tokens=max_new_tokens, seed=seed * 1_000_003 + chunk[0].uid, version=version)
    for p, g, s in zip(chunk, greedy, sampled):
        source = str(p.metadata.get(source_key, "")) if source_key else ""
        out.append(score_prompt(p.uid, source, g, s, verify, cfg.correct_threshold, p.metadata, p.text))
    return out
