"""Memory of a whole training job: peak PSS of every process it starts.

    python tests/bench/bench_memory.py [--model-path DIR] [fleetrl train overrides ...]

Runs ``fleetrl train`` (the default job unless overrides are given) in a
subprocess and samples, every 0.25 s, the proportional set size (PSS, from
``/proc/PID/smaps_rollup``; shared pages are split between the processes that
map them, so the sum is not inflated by shared libraries) of the driver and all
its descendants: Ray's GCS, raylet, dashboard agent, object store and every
actor. Prints the peak of that sum, the peak per process kind, and the peak RSS
each actor reports itself (``summary.json``: learner, largest rollout worker,
largest reward worker, driver). Linux only.

The default job's budget is 4 GiB in total.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script: the sibling procs.py
from procs import descendants, pss_mib, role  # noqa: E402

BUDGET_MIB = 4096


def main() -> None:
    args = sys.argv[1:]
    out_dir = tempfile.mkdtemp(prefix="fleetrl-mem-")
    env = dict(os.environ, RAY_AUTH_MODE=os.environ.get("RAY_AUTH_MODE", "disabled"))
    cmd = [str(Path(sys.executable).with_name("fleetrl")), "train", "--output-dir", out_dir, "--no-progress", *args]
    print("running:", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak_total, peak_by_kind, done = 0.0, defaultdict(float), threading.Event()

    def sample():
        nonlocal peak_total
        while not done.is_set():
            by_kind: dict[str, float] = defaultdict(float)
            for pid in descendants(proc.pid):
                by_kind[role(pid)] += pss_mib(pid)
            peak_total = max(peak_total, sum(by_kind.values()))
            for k, v in by_kind.items():
                peak_by_kind[k] = max(peak_by_kind[k], v)
            done.wait(0.25)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    for line in proc.stdout:
        print("  |", line.rstrip(), flush=True)
    proc.wait()
    done.set()
    t.join()
    summary = json.loads((Path(out_dir) / "summary.json").read_text()) if proc.returncode == 0 else {}
    print(f"\npeak total PSS of the job: {peak_total:.0f} MiB (budget {BUDGET_MIB} MiB)")
    for k, v in sorted(peak_by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  peak {k:<24} {v:8.0f} MiB")
    print("self-reported peak RSS (MiB):", summary.get("peak_rss_mib"))
    print(json.dumps({"peak_total_pss_mib": round(peak_total), "by_kind": {k: round(v) for k, v in peak_by_kind.items()},
                      "peak_rss_mib": summary.get("peak_rss_mib"), "steps": summary.get("steps"),
                      "returncode": proc.returncode}))
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
