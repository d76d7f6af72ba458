"""Where a run's actors go: its placement group, the wait until all are placed, placement.json."""

from __future__ import annotations

import json
from pathlib import Path

import ray

from actors.runtime.placement import bundle, in_bundle
from learner.config import Config
from learner.driver.errors import RunFailed


def placement_group(c: Config, name: str):
    """With ``train.placement``: one placement group, bundle 0 the learner, then the rollout
    workers, then the reward workers. Returns ``(group or None, each one's actor options)``.
    Learner ranks (``learner.num_workers`` > 1) have a group of their own (``learner.placement``):
    the learner's options are then empty and this group starts with the rollout workers."""
    n = 1 + c.rollout.num_workers + c.reward.num_workers
    if c.train.placement == "none":
        return None, [{}] * n
    from ray.util.placement_group import placement_group as make_group

    own = c.learner.num_workers == 1
    bundles = ([bundle(c.learner.num_cpus, c.learner.num_gpus, c.learner.resources)] * own
               + [bundle(c.rollout.num_cpus, c.rollout.num_gpus, c.rollout.resources)] * c.rollout.num_workers
               + [bundle(c.reward.num_cpus, 0, c.reward.resources)] * c.reward.num_workers)
    pg = make_group(bundles, strategy=c.train.placement.upper(), name=name)
    try:
        ray.get(pg.ready(), timeout=c.rollout.replace_timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise RunFailed(f"placement group ({c.train.placement}) of {bundles} not ready within "
                        f"{c.rollout.replace_timeout_s:.0f}s; cluster: {ray.cluster_resources()}") from None
    return pg, [{}] * (not own) + [in_bundle(pg, i) for i in range(len(bundles))]


def place(c: Config, learner, rollouts, rewards, timeout_s: float) -> dict:
    """Wait until every actor runs; fail naming the resources if the cluster cannot place them."""
    try:
        return {"learner": ray.get(learner.where.remote(), timeout=timeout_s),
                "rollout": rollouts.where(timeout_s), "reward": rewards.where(timeout_s)}
    except ray.exceptions.GetTimeoutError:
        raise RunFailed(
            f"actors not placed within {timeout_s:.0f}s: does the cluster offer what they ask for? "
            f"learner: num_cpus={c.learner.num_cpus} num_gpus={c.learner.num_gpus} resources={c.learner.resources}; "
            f"each of {c.rollout.num_workers} rollout workers: num_cpus={c.rollout.num_cpus} "
            f"num_gpus={c.rollout.num_gpus} resources={c.rollout.resources}; each of {c.reward.num_workers} "
            f"reward workers: num_cpus={c.reward.num_cpus} resources={c.reward.resources}; "
            f"cluster: {ray.cluster_resources()}") from None


def report_placement(run_dir: Path, placement: dict, say) -> None:
    (Path(run_dir) / "placement.json").write_text(json.dumps(placement, indent=2))
    say(f"learner on node {placement['learner']['node_ip']} pid {placement['learner']['pid']}")
    for kind in ("rollout", "reward"):
        for w in placement[kind]:
            say(f"{w['name']} on node {w['node_ip']} pid {w['pid']}")
