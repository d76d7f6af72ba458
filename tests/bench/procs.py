"""The processes of a local run, for the benchmarks: its process tree, each process's
role, CPU seconds and PSS (read from /proc; one walker for bench_memory and vs_trl)."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

ROLES = (("ray::Learner", "learner"), ("ray::RolloutAct", "rollout"), ("ray::RewardActor", "reward"),
         ("ray::Coordinator", "coordinator"), ("ray::IDLE", "ray idle (pre-started) workers"),
         ("gcs_server", "gcs"), ("raylet", "raylet"), ("ashboard", "ray dashboard + agent"),
         ("RuntimeEnvAgent", "ray runtime-env agent"), ("log_monitor", "ray log monitor"))


def descendants(root: int) -> list[int]:
    """``root`` and every process below it (the Ray daemons and actors of a local instance
    descend from the driver)."""
    kids: dict[int, list[int]] = defaultdict(list)
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    kids[int(f.read().rsplit(")", 1)[1].split()[1])].append(int(d))
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def role(pid: int, driver: int | None = None) -> str:
    """What a process of the run is (``driver`` is the pid of the process that runs the job)."""
    if pid == driver:
        return "driver"
    cmd = cmdline(pid)
    for key, name in ROLES:
        if key in cmd:
            return name
    if "fleetrl" in cmd:
        return "driver"
    parts = cmd.split()
    return "other: " + next((Path(p).name for p in parts[1:] if p.endswith(".py")), parts[0] if parts else "?")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (0.0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def pss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def cpu_by_process(root: int | None = None) -> dict[int, tuple[str, float]]:
    """pid -> (role, CPU seconds) for ``root`` (default: this process) and its descendants;
    profilers (py-spy) are not part of the run."""
    root = os.getpid() if root is None else root
    return {p: (role(p, driver=root), cpu_seconds(p)) for p in descendants(root) if "py-spy" not in cmdline(p)}


def cpu_delta(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds per role between two ``cpu_by_process`` snapshots."""
    out: dict[str, float] = {}
    for pid, (r, t) in after.items():
        out[r] = out.get(r, 0.0) + t - before.get(pid, (r, 0.0))[1]
    return out
