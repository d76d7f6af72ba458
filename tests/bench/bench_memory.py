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
import time
from collections import defaultdict
from pathlib import Path

BUDGET_MIB = 4096


def children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = defaultdict(list)
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids[ppid].append(int(d))
    return kids


def tree(root: int) -> list[int]:
    kids, out, todo = children_map(), [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def pss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def kind(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"
    for key, name in (("ray::Learner", "learner"), ("ray::RolloutActor", "rollout actor"),
                      ("ray::RewardActor", "reward actor"), ("ray::CoordinatorActor", "coordinator"),
                      ("ray::IDLE", "ray idle (pre-started) workers"), ("gcs_server", "ray gcs"),
                      ("raylet", "ray raylet"), ("Dashboard", "ray dashboard + agent"),
                      ("dashboard", "ray dashboard + agent"), ("RuntimeEnvAgent", "ray runtime-env agent"),
                      ("log_monitor", "ray log monitor"), ("fleetrl", "driver")):
        if key in cmd:
            return name
    parts = cmd.split()
    script = next((Path(p).name for p in parts[1:] if p.endswith(".py")), parts[0] if parts else "?")
    return "other: " + script


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
            for pid in tree(proc.pid):
                by_kind[kind(pid)] += pss_mib(pid)
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
