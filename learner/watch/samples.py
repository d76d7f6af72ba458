"""A few of a step's prompts, completions and rewards, every N steps: ``RUN_DIR/samples.jsonl``
and TensorBoard's text tab (tag ``samples``).

One row per sample: ``{"step", "policy_version", "prompt", "completion", "reward",
"rewards": {name: reward}}`` (``policy_version``: the policy that generated it). Texts
longer than ``MAX_CHARS`` are cut in the file (``MAX_TABLE_CHARS`` in the table), with a
note of how much was left out.
"""

from __future__ import annotations

from pathlib import Path

from learner.watch.jsonl import append, open_cut_back

MAX_CHARS = 2000
"""Longest prompt or completion kept in ``samples.jsonl``."""
MAX_TABLE_CHARS = 400
"""Longest prompt or completion shown in the TensorBoard table."""


def cut(text, limit: int) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= limit else f"{text[:limit]}… [+{len(text) - limit} chars]"


def pick(rows: list[dict], k: int) -> list[dict]:
    """``k`` of ``rows`` spread over the reward range: the highest, the lowest, and evenly between."""
    ranked = sorted(rows, key=lambda r: -_reward(r))
    if len(ranked) <= k:
        return ranked
    if k == 1:
        return ranked[:1]
    idx = sorted({round(i * (len(ranked) - 1) / (k - 1)) for i in range(k)})
    return [ranked[i] for i in idx]


def _reward(r: dict) -> float:
    v = r.get("reward")
    return float(v) if isinstance(v, (int, float)) else float("-inf")


def markdown_table(step: int, rows: list[dict]) -> str:
    """The rows as a Markdown table (``|`` escaped, line breaks shown as ``⏎``)."""
    def cell(text) -> str:
        return cut(text, MAX_TABLE_CHARS).replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace(
            "\n", " ⏎ ")

    lines = [f"**step {step}**", "", "| reward | rewards | policy | prompt | completion |", "|---|---|---|---|---|"]
    for r in rows:
        rewards = ", ".join(f"{k} {v:.3g}" if isinstance(v, (int, float)) else f"{k} {v}"
                            for k, v in (r.get("rewards") or {}).items())
        reward = r.get("reward")
        shown = f"{reward:.3g}" if isinstance(reward, (int, float)) else str(reward)
        lines.append(f"| {shown} | {cell(rewards)} | {r.get('policy_version')} | {cell(r.get('prompt'))} | "
                     f"{cell(r.get('completion'))} |")
    return "\n".join(lines)


class SampleLog:
    """Appends ``per_write`` samples to ``RUN_DIR/samples.jsonl`` every ``every`` steps
    (``every`` 0 = never); a resumed run first cuts the file back to ``resume_step``."""

    def __init__(self, run_dir: Path, every: int, per_write: int, *, resume_step: int | None = None):
        self.path = Path(run_dir) / "samples.jsonl"
        self.every, self.per_write = every, per_write
        self.file = None
        if every:
            self.file, _, _ = open_cut_back(self.path, resume_step)
        elif resume_step is None:  # a fresh run that logs none: no samples of an earlier run in the directory
            self.path.unlink(missing_ok=True)

    def due(self, step: int) -> bool:
        """Whether step ``step`` logs samples (ask the learner for them only then)."""
        return bool(self.every) and step % self.every == 0 and self.file is not None

    def write(self, step: int, rows: list[dict], writers=None) -> list[dict]:
        """At a due step: log up to ``per_write`` of ``rows`` (dicts with prompt, completion, reward,
        rewards, policy_version) to the file and, as a table, to ``writers.text`` (a
        ``MetricWriters``). Returns the rows written ([] at a step that is not due)."""
        if not self.due(step) or not rows:
            return []
        out = [{"step": step, "policy_version": r.get("policy_version"), "prompt": cut(r.get("prompt"), MAX_CHARS),
                "completion": cut(r.get("completion"), MAX_CHARS), "reward": r.get("reward"),
                "rewards": dict(r.get("rewards") or {})} for r in pick(rows, self.per_write)]
        for row in out:
            append(self.file, row)
        if writers is not None:
            writers.text(step, "samples", markdown_table(step, out))
        return out

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
