"""The one score validator: every reward source's output passes through it, once.

Where it runs (exactly once per score):

* in-process reward functions: the reward worker (``worker.py``);
* local HF checkpoints: ``models.LocalRewardModel``;
* remote servers: ``client.RemoteRewardClient`` on each response;
* ``fleetrl reward serve``: ``server.checked_scores`` before answering.

A reward function may return, in place of a float, an ``Excluded`` for a
sample it could not score (e.g. the math verifier's ``reward_timeout``): it
passes through unchanged, so the sample is excluded, never scored.

A reward *model* (local or remote) returns results that already went through
it: per sample a finite float or an ``Excluded``; the reward worker then only
checks the shape (``check_results``). A failure is never turned into a score.
What a model is asked to score is a ``ScoreBatch`` (text, token ids, metadata).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Real

from actors.types import Excluded, Exclusion, Group, Sample

Result = list  # list[float | Excluded]: a score, or why the sample could not be scored


def validate_scores(name: str, scores, n: int) -> list[float | Excluded]:
    """Per sample: a finite float, or an ``Excluded`` saying why it is unusable (an ``Excluded``
    the function returned for a sample passes through unchanged)."""
    try:
        values = list(scores)
    except TypeError:
        return excluded(n, Exclusion.REWARD_INVALID,
                        f"{name!r} returned {type(scores).__name__}, not a list of floats")
    if len(values) != n:
        return excluded(n, Exclusion.REWARD_COUNT, f"{name!r} returned {len(values)} scores for {n} samples")
    return [_one(name, v) for v in values]


def _one(name: str, v) -> float | Excluded:
    if isinstance(v, Excluded):  # the function itself says why it could not score this sample
        return v
    try:
        f = float(v)
    except (TypeError, ValueError):
        return Excluded(Exclusion.REWARD_INVALID, f"{name!r} returned non-numeric {v!r}")
    return f if math.isfinite(f) else Excluded(Exclusion.REWARD_NONFINITE, f"{name!r} returned {f}")


def excluded(n: int, kind: Exclusion, detail: str) -> list[Excluded]:
    """The same reason for all ``n`` samples of a call."""
    return [Excluded(kind, detail)] * n


def raised(name: str, e: BaseException, n: int) -> list[Excluded]:
    """A reward source raised: every sample of the call is ``reward_error``."""
    return excluded(n, Exclusion.REWARD_ERROR, f"{name!r} raised {type(e).__name__}: {e}")


def check_results(name: str, results, n: int) -> Result:
    """A reward model's (already validated) results: only the shape is checked here.

    A model that breaks the contract (not one finite float or ``Excluded`` per
    sample) flags the whole call; its values are not re-validated one by one.
    """
    if not isinstance(results, (list, tuple)) or len(results) != n:
        got = len(results) if isinstance(results, (list, tuple)) else type(results).__name__
        return excluded(n, Exclusion.REWARD_COUNT, f"model {name!r} returned {got} results for {n} samples")
    if not all(isinstance(r, Excluded) or (isinstance(r, Real) and math.isfinite(r)) for r in results):
        return excluded(n, Exclusion.REWARD_INVALID,
                        f"model {name!r} broke its contract (not one finite score or Excluded per sample)")
    return list(results)


@dataclass(kw_only=True)
class ScoreBatch:
    """What a reward model is asked to score: per sample its text, token ids and metadata."""

    prompts: list[str]
    completions: list[str]
    metadata: dict[str, list]
    """Each key (e.g. ``answer``) as a list aligned with ``prompts``."""
    prompt_ids: list[list[int]] = field(default_factory=list)
    """Per sample the policy's prompt token ids (empty list: not known)."""
    completion_ids: list[list[int]] = field(default_factory=list)
    """Per sample the generated token ids (empty list: not known)."""

    @classmethod
    def of(cls, flat: list[tuple[Group, Sample]]) -> "ScoreBatch":
        """Per sample: the prompt, what the sample asks to be scored (an episode: its last turn)
        and the prompt's metadata updated by the sample's own (an episode's ``finish``)."""
        meta = [{**g.prompt.metadata, **s.metadata} for g, s in flat]
        keys = sorted({k for m in meta for k in m})
        return cls(prompts=[g.prompt.text for g, _ in flat],
                   completions=[s.completion_text if s.scored_text is None else s.scored_text for _, s in flat],
                   metadata={k: [m.get(k) for m in meta] for k in keys},
                   prompt_ids=[list(g.prompt_ids) for g, _ in flat],
                   completion_ids=[list(s.completion_ids) for _, s in flat])

    def __len__(self) -> int:
        return len(self.prompts)

    def slice(self, sl: slice) -> "ScoreBatch":
        return ScoreBatch(prompts=self.prompts[sl], completions=self.completions[sl],
                          metadata={k: v[sl] for k, v in self.metadata.items()},
                          prompt_ids=self.prompt_ids[sl], completion_ids=self.completion_ids[sl])


def first_failure(results: Result) -> Excluded | None:
    return next((r for r in results if isinstance(r, Excluded)), None)
