"""Where the time goes in the vs_trl configurations: TRL (OMP passive) vs fleetrl sync and async.

    python tests/bench/vs_trl_profile.py [2x4] [8x8] [--seconds 20] [--py-spy]

Same setup as ``vs_trl.py`` (same functions run the frameworks). For each run it
prints wall ms/step, CPU ms/step per process (user + system; fleetrl: driver,
learner, rollout workers, reward worker, coordinator, raylet, gcs, other Ray
processes), fleetrl's own phase times, and with ``--py-spy`` attaches
``py-spy record --nonblocking`` to every fleetrl process for the steady part of
the run and prints, per process, the share of samples in fleetrl's functions
and the top leaf frames. (py-spy counts a thread that waits for a CPU as
active: read its shares within a process, the CPU columns across processes.)
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import vs_trl  # noqa: E402

PY_SPY = "--py-spy" in sys.argv


def attach_py_spy(out_prefix: Path, seconds: float, procs: list):
    def on_start(trainer):
        import ray

        placement = json.loads((trainer.run_dir / "placement.json").read_text())
        pids = {"driver": os.getpid(), "learner": placement["learner"]["pid"],
                "coordinator": ray.get(trainer.coordinator.__ray_call__.remote(lambda _self: os.getpid()))}
        for kind in ("rollout", "reward"):
            for w in placement[kind]:
                pids[w["name"]] = w["pid"]
        spy = Path(sys.executable).with_name("py-spy")
        for name, pid in pids.items():
            procs.append((name, out_prefix.with_name(f"{out_prefix.name}-{name}.txt"), subprocess.Popen(
                [str(spy), "record", "--nonblocking", "-r", "50", "-d", str(max(1, int(seconds - 4))), "-f", "raw",
                 "-o", str(out_prefix.with_name(f"{out_prefix.name}-{name}.txt")), "-p", str(pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))

    return on_start


def summarize_py_spy(name: str, path: Path, top: int = 6) -> None:
    if not path.exists():
        print(f"    {name}: no py-spy output")
        return
    total, ours, leaves = 0, collections.Counter(), collections.Counter()
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        n = int(n)
        total += n
        frames = stack.split(";")
        seen = set()
        for f in frames:
            m = re.match(r"(.+?) \((?:.*/)?((?:actors|learner)/[\w/]+\.py):\d+\)$", f)
            if m and m.group(1) not in seen:
                seen.add(m.group(1))
                ours[f"{m.group(1)} ({m.group(2)})"] += n
        leaves[re.sub(r"\(.*/site-packages/", "(", frames[-1])] += n
    print(f"    {name}: {total} samples; fleetrl functions (inclusive): "
          + ", ".join(f"{f} {100 * c / total:.0f}%" for f, c in ours.most_common(top)))
    print("      top leaf frames: " + "; ".join(f"{f} {100 * c / total:.0f}%" for f, c in leaves.most_common(top)))


def main():
    import ray

    labels = [a for a in sys.argv[1:] if re.fullmatch(r"\d+x\d+", a)] or ["2x4", "8x8"]
    seconds = float(vs_trl.arg("--seconds", "20"))
    tmp = Path(tempfile.mkdtemp(prefix="fleetrl-vs-trl-profile-"))
    policy = vs_trl.warm_policy()
    ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.2", include_dashboard=False,
             object_store_memory=500_000_000, log_to_driver=False)
    for label in labels:
        P, G = (int(x) for x in label.split("x"))
        for kind in ("trl_passive", "sync", "async"):
            procs: list = []
            load = os.getloadavg()[0]
            if kind == "trl_passive":
                run = vs_trl.run_trl(policy, P, G, seconds, tmp, f"{label}-{kind}", passive=True)
            else:
                run = vs_trl.run_fleetrl(policy, P, G, seconds, {"sync": 0, "async": 1}[kind], tmp, f"{label}-{kind}",
                                         on_start=attach_py_spy(tmp / f"spy-{label}-{kind}", seconds, procs)
                                         if PY_SPY else None)
            for _, _, p in procs:
                p.wait()
            tp = vs_trl.throughput(run, P * G)
            steps = tp["steps"]
            cpu = run["cpu_s"]
            print(f"{label} {kind}: {steps} steps, {1e3 * tp['s_per_step_median']:.1f} ms/step median "
                  f"({tp['sps']:.0f} samples/s), load avg {load:.1f}; CPU {1e3 * sum(cpu.values()) / steps:.1f} ms/step"
                  + ("" if len(cpu) == 1 else ": " + ", ".join(
                      f"{k} {1e3 * v / steps:.1f}" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]))),
                  flush=True)
            if "phases" in run:
                ph = run["phases"]
                print(f"    phases (median): sample {1e3 * ph['sample_s']:.1f} ms, update + sync "
                      f"{1e3 * ph['update_sync_s']:.1f} ms ({1e3 * ph['update_s']:.1f} ms in the learner's update, "
                      f"{ph['active_samples']:.0f} active samples)", flush=True)
            for name, path, _ in procs:
                summarize_py_spy(name, path)
            time.sleep(1)
    ray.shutdown()
    print(f"raw profiles: {tmp}")


if __name__ == "__main__":
    main()
