"""``RUN_DIR/report.png``: one picture of a run, drawn from its files only.

Reads ``metrics.jsonl`` (one row per step), ``eval.jsonl`` if there is one (one row per
held-out evaluation, step 0 = before training; without it, the ``eval_accuracy`` of the
metrics rows and ``summary.json``'s before/after are used) and ``summary.json`` if the
run has ended. Works on a run still in progress: a torn last line is skipped, missing
keys leave their lines out, a panel with nothing to show says so. matplotlib's Agg
canvas only (no screen, no pyplot state).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from learner.watch.jsonl import read_rows

EVAL_MAIN = "greedy_accuracy"
"""The evaluation metric drawn first (and the one the title's before -> after is of)."""


def draw_report(run_dir: Path, out: Path | None = None) -> Path:
    """Draw the report of ``run_dir`` to ``out`` (default ``RUN_DIR/report.png``); returns the path.
    Raises ``FileNotFoundError`` without the directory, ``ValueError`` without a metrics row."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    path = run_dir / "metrics.jsonl"
    rows = _by_step(read_rows(path))
    if not rows:
        raise ValueError(f"{path}: no metrics rows yet")
    summary = _summary(run_dir / "summary.json")
    evals = _by_step(read_rows(run_dir / "eval.jsonl")) or _evals_from(rows, summary)
    out = Path(out) if out is not None else run_dir / "report.png"

    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 20), dpi=90)
    axes = fig.subplots(5, 2)
    # fixed margins (room for the right-hand axes of the twin panels): constrained layout takes half the time
    fig.subplots_adjust(left=0.055, right=0.93, top=0.94, bottom=0.03, hspace=0.32, wspace=0.32)
    wall, unit = _wall_clock(rows)
    eval_wall = _eval_wall(evals, rows, wall)
    _reward_panel(axes[0][0], [r["step"] for r in rows], rows, [e["step"] for e in evals], evals, "step")
    _reward_panel(axes[0][1], wall, rows, eval_wall, evals, f"wall time since RL start ({unit})")
    axes[0][0].set_title("Training reward and held-out evaluation, by step")
    axes[0][1].set_title("... by wall time")
    _by_name_panel(axes[1][0], rows)
    _eval_panel(axes[1][1], evals)
    _lines(axes[2][0], rows, {"response_len_mean": "mean completion length"}, "Completion length", "tokens")
    _staleness_panel(axes[2][1], rows, summary)
    _throughput_panel(axes[3][0], rows)
    _phase_panel(axes[3][1], rows)
    _policy_panel(axes[4][0], rows)
    _loss_panel(axes[4][1], rows)
    title = _title(run_dir, rows, evals, summary)
    fig.suptitle(title, fontsize=13, y=0.99)
    out.parent.mkdir(parents=True, exist_ok=True)
    # the title and what was drawn, also as PNG text chunks (for scripts and tests)
    fig.savefig(out, metadata={"Title": title.replace("\n", " | "), "Description":
                               f"fleetrl report: metrics rows {len(rows)}, eval rows {len(evals)}"})
    return out


# -- reading ------------------------------------------------------------------------------------------
def _by_step(rows: list[dict]) -> list[dict]:
    """Rows in step order, the last one of a step kept."""
    return [r for _, r in sorted({r["step"]: r for r in rows}.items())]


def _summary(path: Path) -> dict | None:
    try:
        s = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return s if isinstance(s, dict) else None


def _num(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _accuracy(v) -> float | None:
    """An evaluation result: a number, or a dict with ``greedy_accuracy``."""
    return _num(v.get(EVAL_MAIN)) if isinstance(v, dict) else _num(v)


def _evals_from(rows: list[dict], summary: dict | None) -> list[dict]:
    """Evaluation points without ``eval.jsonl``: summary.json's before/after and the rows' ``eval_accuracy``."""
    points = {}
    if summary and _accuracy(summary.get("eval_before")) is not None:
        points[0] = {"step": 0, EVAL_MAIN: _accuracy(summary["eval_before"])}
    for r in rows:
        if _num(r.get("eval_accuracy")) is not None:
            points[r["step"]] = {"step": r["step"], EVAL_MAIN: r["eval_accuracy"]}
    if summary and _accuracy(summary.get("eval_after")) is not None:
        step = summary.get("steps") if isinstance(summary.get("steps"), int) else rows[-1]["step"]
        points[step] = {"step": step, EVAL_MAIN: _accuracy(summary["eval_after"])}
    return [p for _, p in sorted(points.items())]


ACCURACY = re.compile(r"(pass|mean)@(\d+)|.*accuracy")
"""The evaluation metrics drawn (on a 0..1 axis); counts and timings of eval.jsonl (prompts, eval_s...) are not."""


def _eval_metrics(evals: list[dict]) -> list[str]:
    """The accuracy-like metric names of the evaluation rows: greedy accuracy, then pass@k, mean@k, others."""
    names = {k for e in evals for k, v in e.items() if ACCURACY.fullmatch(k) and _num(v) is not None}

    def order(k: str):
        m = re.fullmatch(r"(pass|mean)@(\d+)", k)
        return (0, 0, 0) if k == EVAL_MAIN else (1, m.group(1) != "pass", int(m.group(2))) if m else (2, 0, k)

    return sorted(names, key=order)


# -- the x axes ---------------------------------------------------------------------------------------
def _wall_clock(rows: list[dict]) -> tuple[list[float], str]:
    """Each row's wall time since RL start (unix ``t``, so restarts count; else ``time_s``) and its unit."""
    if all(_num(r.get("t")) is not None for r in rows):
        t0 = rows[0]["t"] - (_num(rows[0].get("time_s")) or 0.0)
        secs = [r["t"] - t0 for r in rows]
    else:
        secs = [_num(r.get("time_s")) or 0.0 for r in rows]
    top = max(secs, default=0.0)
    scale, unit = (3600.0, "h") if top > 3 * 3600 else (60.0, "min") if top > 180 else (1.0, "s")
    return [s / scale for s in secs], unit


def _eval_wall(evals: list[dict], rows: list[dict], wall: list[float]) -> list[float]:
    """Wall time of each evaluation: that of the metrics row of its step (step 0: the start)."""
    at = {r["step"]: w for r, w in zip(rows, wall)}
    first = rows[0]["step"]
    return [at.get(e["step"], 0.0 if e["step"] < first else wall[-1]) for e in evals]


# -- panels -------------------------------------------------------------------------------------------
def _series(rows: list[dict], key: str, xs: list[float] | None = None):
    xs = [r["step"] for r in rows] if xs is None else xs
    pts = [(x, _num(r.get(key))) for x, r in zip(xs, rows)]
    pts = [(x, y) for x, y in pts if y is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _smooth(ys: list[float]) -> tuple[list[float], int]:
    """A trailing moving average over about a fifteenth of the points (window 1 for short series)."""
    w = max(1, len(ys) // 15) if len(ys) >= 20 else 1
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y - (ys[i - w] if i >= w else 0.0)
        out.append(acc / min(i + 1, w))
    return out, w


def _style(n: int) -> dict:
    return {"marker": "o", "markersize": 3} if n <= 30 else {}


def _plot(ax, xs, ys, label: str, *, smooth: bool = True, **kw) -> bool:
    """A line of ``ys`` (smoothed when long, the raw values faint behind it); False if empty."""
    if not ys:
        return False
    smooth, w = _smooth(ys) if smooth else (ys, 1)
    if w > 1:
        line, = ax.plot(xs, ys, alpha=0.25, linewidth=0.8, **kw)
        ax.plot(xs, smooth, color=line.get_color(), label=f"{label} ({w}-step mean)", linewidth=1.6)
    else:
        ax.plot(xs, ys, label=label, **_style(len(ys)), **kw)
    return True


def _empty(ax, what: str) -> None:
    ax.text(0.5, 0.5, what, transform=ax.transAxes, ha="center", va="center", color="grey", fontsize=11)


def _finish(ax, title: str, ylabel: str, xlabel: str = "step", drawn: bool = True, empty: str = "") -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8, loc="best", framealpha=0.85)
    elif empty:
        _empty(ax, empty)


def _reward_panel(ax, xs, rows, eval_xs, evals, xlabel: str) -> None:
    rx, ry = _series(rows, "reward_mean", xs)
    _plot(ax, rx, ry, "train reward", color="C0")
    in_unit = bool(ry) and 0.0 <= min(ry) and max(ry) <= 1.0
    eax = ax if in_unit else ax.twinx()
    for i, key in enumerate(_eval_metrics(evals)[:4]):
        ex, ey = _series(evals, key, eval_xs)
        eax.plot(ex, ey, marker="os^D"[i], markersize=5, linestyle="-" if i == 0 else "--", color=f"C{3 + i}",
                 label=f"eval {key.replace('_', ' ')}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("reward" + (" / eval accuracy (0..1)" if in_unit else ""))
    if not in_unit:
        eax.set_ylabel("held-out eval (0..1)")
    eax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    handles = [h for a in {id(ax): ax, id(eax): eax}.values() for h in a.get_legend_handles_labels()[0]]
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="best", framealpha=0.85)
    if not ry:
        _empty(ax, "no reward_mean in metrics.jsonl")


def _by_name_panel(ax, rows) -> None:
    names = sorted({k for r in rows if isinstance(r.get("reward_by_name"), dict) for k in r["reward_by_name"]})
    drawn = False
    for name in names:
        sub = [{"step": r["step"], "v": (r.get("reward_by_name") or {}).get(name)} for r in rows]
        drawn |= _plot(ax, *_series(sub, "v"), name)
    _finish(ax, "Reward per reward function (reward_by_name)", "mean reward", drawn=drawn,
            empty="no reward_by_name in metrics.jsonl")


def _eval_panel(ax, evals) -> None:
    drawn = False
    for i, key in enumerate(_eval_metrics(evals)):
        ex, ey = _series(evals, key)
        if ey:
            ax.plot(ex, ey, marker="o", linewidth=2, color=f"C{i}", label=key.replace("_", " "))
            drawn = True
    sources = sorted({s for e in evals if isinstance(e.get("by_source"), dict) for s in e["by_source"]})
    for j, source in enumerate(sources):
        sub = [{"step": e["step"], **(e.get("by_source") or {}).get(source, {})} for e in evals]
        key = EVAL_MAIN if any(EVAL_MAIN in s for s in sub) else next(iter(_eval_metrics(sub)), None)
        if key is not None:
            ax.plot(*_series(sub, key), marker="x", linestyle=":", color=f"C{(j + 5) % 10}",
                    label=f"{source}: {key.replace('_', ' ')}")
            drawn = True
    ax.set_ylim(-0.02, 1.02)
    _finish(ax, "Held-out evaluation (step 0 = before RL)", "accuracy", drawn=drawn,
            empty="no evaluation yet (eval.jsonl)")


def _lines(ax, rows, keys: dict, title: str, ylabel: str) -> bool:
    drawn = False
    for key, label in keys.items():
        drawn |= _plot(ax, *_series(rows, key), label)
    _finish(ax, title, ylabel, drawn=drawn, empty=f"no {', '.join(keys)} in metrics.jsonl")
    return drawn


def _staleness_panel(ax, rows, summary) -> None:
    drawn = _plot(ax, *_series(rows, "staleness_mean"), "mean", color="C0")
    mx, my = _series(rows, "staleness_max")
    if my:  # the highest staleness of the last w steps (a mean of maxima would hide the peaks)
        w = max(1, len(my) // 15) if len(my) >= 20 else 1
        peaks = [max(my[max(0, i - w + 1):i + 1]) for i in range(len(my))]
        ax.plot(mx, peaks, drawstyle="steps-post", color="C1", linewidth=1.2,
                label=f"max (of the last {w} steps)" if w > 1 else "max")
    drawn |= bool(my)
    _finish(ax, "Staleness of the trained samples", "policy versions behind", drawn=drawn,
            empty="no staleness_mean / staleness_max in metrics.jsonl")
    limit = _num((summary or {}).get("max_staleness"))
    if drawn and limit is not None:
        ax.axhline(limit, color="grey", linestyle=":", linewidth=1.5, zorder=1,
                   label=f"train.max_staleness = {limit:g}")
        ax.set_ylim(-0.05, max([limit, *my]) + 0.5)
        ax.legend(fontsize=8, loc="best", framealpha=0.85)


def _throughput_panel(ax, rows) -> None:
    drawn = _plot(ax, *_series(rows, "samples_per_s"), "average since RL start")
    xs, ys = [], []
    for prev, r in zip(rows, rows[1:]):  # the step's own rate (a restart resets time_s: skipped)
        dt = (_num(r.get("time_s")) or 0.0) - (_num(prev.get("time_s")) or 0.0)
        if dt > 0 and _num(r.get("samples")) is not None:
            xs.append(r["step"])
            ys.append(r["samples"] / dt)
    drawn |= _plot(ax, xs, ys, "this step")
    _finish(ax, "Throughput (samples trained)", "samples / s", drawn=drawn, empty="no samples_per_s in metrics.jsonl")


def _phase_panel(ax, rows) -> None:
    keep = [r for r in rows if _num(r.get("sample_s")) is not None and _num(r.get("update_sync_s")) is not None]
    if keep:
        xs = [r["step"] for r in keep]
        sample = [r["sample_s"] for r in keep]
        update = [min(_num(r.get("update_s")) or 0.0, r["update_sync_s"]) for r in keep]
        sync = [r["update_sync_s"] - u for r, u in zip(keep, update)]
        labels = ["sample (waiting for rollouts)", "update (learner step)", "weight sync + overhead"]
        if not any(_num(r.get("update_s")) is not None for r in keep):
            update, labels[2] = [0.0] * len(keep), "update + weight sync"
        (sample, w), (update, _), (sync, _) = _smooth(sample), _smooth(update), _smooth(sync)
        ax.stackplot(xs, sample, update, sync, labels=labels, alpha=0.8, colors=["C0", "C1", "C2"])
    title = "Time per step, by phase (stacked" + (f", {w}-step mean)" if keep and w > 1 else ")")
    _finish(ax, title, "seconds", drawn=bool(keep),
            empty="no sample_s / update_sync_s in metrics.jsonl")


def _policy_panel(ax, rows) -> None:
    _two_axes(ax, rows, {"clip_frac": "clip_frac", "approx_kl": "approx_kl", "kl": "kl (to the reference)"},
              ("entropy", "entropy (right axis)", "entropy (nats per token)"), "Policy change per update",
              "fraction / KL")


def _loss_panel(ax, rows) -> None:
    _two_axes(ax, rows, {"loss": "loss"}, ("grad_norm", "grad norm (right axis)", "gradient norm"),
              "Loss and gradient norm", "loss")


def _two_axes(ax, rows, left: dict, right: tuple[str, str, str], title: str, ylabel: str) -> None:
    """``left`` keys on the left axis, ``right`` = (key, label, axis label) on a second one at the right."""
    for i, (key, label) in enumerate(left.items()):
        _plot(ax, *_series(rows, key), label, color=f"C{i}")
    handles, labels = ax.get_legend_handles_labels()
    rx, ry = _series(rows, right[0])
    if ry:
        tax = ax.twinx()
        _plot(tax, rx, ry, right[1], color="C4")
        tax.set_ylabel(right[2])
        h, l = tax.get_legend_handles_labels()
        handles, labels = handles + h, labels + l
    _finish(ax, title, ylabel, drawn=False, empty="")
    if handles:
        ax.legend(handles, labels, fontsize=8, loc="best", framealpha=0.85)
    else:
        _empty(ax, f"no {' / '.join([*left, right[0]])} in metrics.jsonl")


# -- the title ----------------------------------------------------------------------------------------
def _title(run_dir: Path, rows, evals, summary) -> str:
    last = rows[-1]
    if summary and isinstance(summary.get("steps"), int) and summary["steps"] < last["step"]:
        # the summary of an earlier segment: the run was resumed and is running again
        status = f"in progress (resumed; summary.json: {summary.get('status', '?')} at step {summary['steps']})"
        steps, summary = last["step"], None
    elif summary:
        status = str(summary.get("status", "?"))
        if summary.get("reason"):
            reason = str(summary["reason"]).splitlines()[0]
            status += f" ({reason[:80]}{'…' if len(reason) > 80 else ''})"
        steps = summary.get("steps", last["step"])
    else:
        status, steps = "in progress (no summary.json yet)", last["step"]
    before = _accuracy(summary.get("eval_before")) if summary else None
    after = _accuracy(summary.get("eval_after")) if summary else None
    accs = [(e["step"], _num(e.get(EVAL_MAIN))) for e in evals if _num(e.get(EVAL_MAIN)) is not None]
    if before is None and accs and accs[0][0] == 0:
        before = accs[0][1]
    if after is None and accs and accs[-1][0] > 0:
        after = accs[-1][1]
    rewards = [y for y in (_num(r.get("reward_mean")) for r in rows) if y is not None]
    k = max(1, len(rewards) // 10)
    reward = (f"train reward {sum(rewards[:k]) / k:.3f} -> {sum(rewards[-k:]) / k:.3f}" if len(rewards) > 1 else
              f"train reward {rewards[0]:.3f}" if rewards else None)
    ev = (f"eval {before:.3f} -> {after:.3f}" if before is not None and after is not None else
          f"eval before {before:.3f}" if before is not None else "no eval yet")
    sps = _num((summary or {}).get("samples_per_s")) or _num(last.get("samples_per_s"))
    wall = _num((summary or {}).get("wall_s"))
    parts = [f"{steps} step{'' if steps == 1 else 's'}", reward, ev,
             f"{sps:.1f} samples/s" if sps is not None else None,
             f"wall {wall / 60:.1f} min" if wall is not None else None]
    return f"{run_dir.resolve().name}: {status}\n" + " | ".join(p for p in parts if p)
