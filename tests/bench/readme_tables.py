"""One command for the README's fleetrl-vs-TRL tables: runs the benchmarks, rewrites the tables.

    python tests/bench/readme_tables.py [--quick] [--only tiny|smollm2] [--dry-run]

- ``tiny``: ``vs_trl.py`` (2 x 4 and 8 x 8, 2 rounds; ``--quick``: its smoke run) -> the
  throughput table, the held-out-accuracy-vs-wall-clock table (8 x 8) and where the time goes
  per step (fleetrl's phases, CPU per process), between ``<!-- vs-trl:start -->`` and
  ``<!-- vs-trl:end -->``;
- ``smollm2``: ``vs_trl_smollm2.py --steps 12`` (needs ``FLEETRL_CACHE`` holding SmolLM2,
  ``fleetrl model prepare smollm2``) -> its row between ``<!-- vs-trl-smollm2:start -->`` and
  ``<!-- vs-trl-smollm2:end -->``.

Each benchmark runs as a subprocess and writes its results as JSON (``--json-out``); this
script only renders them. ``--dry-run`` prints the tables instead of writing README.md. Run it
on a quiet machine: the figures are ratios measured side by side, but a busy machine slows the
runners unequally. The prose around the tables is not rewritten: read it against the figures.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
NAMES = {"trl": "TRL", "trl_passive": "TRL (OMP passive)", "sync": "fleetrl sync", "async": "fleetrl async"}


def run_bench(script: str, args: list[str], out: Path) -> dict:
    cmd = [sys.executable, str(ROOT / "tests" / "bench" / script), *args, "--json-out", str(out)]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return json.loads(out.read_text())


def fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def tiny_tables(res: dict, cmd: str) -> str:
    """The throughput table, accuracy vs wall clock at the largest shape, and the phases."""
    lines = [f"`{cmd}`; held-out greedy accuracy at the start {res['heldout_start']:.3f}.", "",
             "| P × G | runner | samples/s | s/step (median) | ÷ TRL |", "|---|---|---|---|---|"]
    for label, c in res["configs"].items():
        best = c[c["trl_best"]]
        for k in ("trl_best", "sync", "async"):
            s = best if k == "trl_best" else c.get(k)
            if s is None:
                continue
            ratio = 1.0 if k == "trl_best" else s.get("sps_over_trl")
            name = NAMES[c["trl_best"]] if k == "trl_best" else NAMES[k]
            lines.append(f"| {label.replace('x', ' × ')} | {name} | {fmt(s['samples_per_s'], '.0f')} | "
                         f"{fmt(s['s_per_step_median'], '.4f')} | **{fmt(ratio, '.2f')}** |")
    label, c = list(res["configs"].items())[-1]
    rows = c["reward_vs_time"]
    kinds = [c["trl_best"], "sync", "async"]
    lines += ["", f"Held-out greedy accuracy vs wall clock at {label.replace('x', ' × ')} (mean over the rounds):", "",
              "| t (s) | " + " | ".join(f"{r['t']:.0f}" for r in rows) + " |",
              "|---|" + "---|" * len(rows)]
    for k in kinds:
        lines.append(f"| {NAMES[k]} | " + " | ".join(fmt(r["heldout"].get(k), ".3f") for r in rows) + " |")
    lines += ["", "Where the time goes (medians per step; CPU: user + system of every process, per step):", "",
              "| P × G | runner | sample (ms) | update + sync (ms) | learner's update (ms) | CPU ms/step | biggest CPU users (ms/step) |",
              "|---|---|---|---|---|---|---|"]
    for label, c in res["configs"].items():
        for k in ("sync", "async"):
            s = c.get(k)
            if s is None:
                continue
            ph = s["phases_ms"]
            top = sorted(s["cpu_ms_per_step_by_process"].items(), key=lambda kv: -kv[1])[:4]
            lines.append(f"| {label.replace('x', ' × ')} | {NAMES[k]} | {ph['sample_s']:.1f} | {ph['update_sync_s']:.1f} | "
                         f"{ph['update_s']:.1f} | {s['cpu_ms_per_step']:.1f} | "
                         + ", ".join(f"{p} {v:.1f}" for p, v in top) + " |")
        t = c[c["trl_best"]]
        lines.append(f"| {label.replace('x', ' × ')} | TRL | – | – | – | {t['cpu_ms_per_step']:.1f} | one process |")
    return "\n".join(lines)


def smollm2_table(res: dict, cmd: str) -> str:
    lines = [f"`{cmd}`", "", "| runner | samples/s | ÷ TRL | learner dtype |", "|---|---|---|---|"]
    for r in res["table"]:
        lines.append(f"| {r['runner']} | {r['samples_per_s']:.2f} | **{r['over_trl']:.2f}** | "
                     f"{r.get('learner_dtype', 'float32 (TRL default)')} |")
    return "\n".join(lines)


def replace_block(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {name}:start -->\n)(.*?)(<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no <!-- {name}:start --> ... <!-- {name}:end --> block")
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(3), text)


def main() -> None:
    quick = "--quick" in sys.argv
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
    tmp = Path(tempfile.mkdtemp(prefix="fleetrl-readme-tables-"))
    blocks = {}
    if only in (None, "tiny"):
        args = ["--quick"] if quick else []
        res = run_bench("vs_trl.py", args, tmp / "tiny.json")
        blocks["vs-trl"] = tiny_tables(res, " ".join(["python tests/bench/vs_trl.py", *args]))
    if only in (None, "smollm2"):
        args = ["--steps", "4" if quick else "12"]
        res = run_bench("vs_trl_smollm2.py", args, tmp / "smollm2.json")
        blocks["vs-trl-smollm2"] = smollm2_table(res, " ".join(["python tests/bench/vs_trl_smollm2.py", *args]))
    if "--dry-run" in sys.argv:
        for name, body in blocks.items():
            print(f"\n<!-- {name} -->\n{body}")
        return
    text = README.read_text()
    for name, body in blocks.items():
        text = replace_block(text, name, body)
    README.write_text(text)
    print(f"README.md: rewrote {', '.join(blocks)}")


if __name__ == "__main__":
    main()
