"""Where actors run: placement-group bundles, runtime envs, and each actor's self-report."""

from __future__ import annotations

import os
import resource
import socket

import ray


def actor_env(num_threads: int, *, passive_omp: bool = True) -> dict:
    """Runtime env for actors sharing CPU cores: bounded threads; passive OpenMP
    waits for side actors so they yield the cores when idle. The learner keeps
    OpenMP's default (spinning) waits (measured: README, Benchmarks)."""
    env = {"OMP_NUM_THREADS": str(num_threads), "TOKENIZERS_PARALLELISM": "false"}
    if passive_omp:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return {"env_vars": env}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (``ru_maxrss`` is KiB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def rss_shmem_mib() -> float | None:
    """Resident shared-memory pages of this process now, MiB (``RssShmem``, Linux): mostly Ray's
    object store pages it wrote or read; ``peak_rss_mib`` counts them too. None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            line = next((x for x in f if x.startswith("RssShmem:")), None)
    except OSError:
        return None
    return round(int(line.split()[1]) / 1024, 1) if line else None


def where() -> dict:
    """Where this actor runs, its peak resident memory so far and its resident shared memory now (MiB)."""
    ctx = ray.get_runtime_context()
    pg = ray.util.get_current_placement_group()
    return {"node_id": ctx.get_node_id(), "host": socket.gethostname(), "pid": os.getpid(),
            "node_ip": ray.util.get_node_ip_address(), "placement_group": pg.id.hex() if pg else None,
            "peak_rss_mib": peak_rss_mib(), "rss_shmem_mib": rss_shmem_mib()}


def bundle(num_cpus: float, num_gpus: float = 0.0, resources: dict | None = None) -> dict:
    """The placement-group bundle an actor with these requirements occupies."""
    b = {"CPU": num_cpus, "GPU": num_gpus, **(resources or {})}
    return {k: v for k, v in b.items() if v > 0} or {"CPU": 0.01}


def in_bundle(pg, index: int | None) -> dict:
    """Actor options that schedule it into bundle ``index`` of ``pg`` (nothing if no pg)."""
    if pg is None or index is None:
        return {}
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(placement_group=pg,
                                                                    placement_group_bundle_index=index)}
