"""The streaming loop one rollout actor runs until the coordinator says stop:

    acquire prompts (waits at the staleness gate)
    -> load newer weights if the coordinator has them (only here, between generate calls)
    -> generate a group per prompt
    -> hand the groups to a reward actor, which scores them and puts them into
       the coordinator's buffer (one reward call in flight per worker, so
       scoring overlaps the next generation).

When told to stop, the loop loads the newest weights if they are newer than its
own (still between generate calls) before it returns: a worker ends on the
run's final version.
"""

from __future__ import annotations

import ray


def run_rollout_loop(worker, coordinator, reward_actors: list) -> dict:
    """Drive ``worker`` (a ``RolloutWorker``) until the coordinator hands out no more
    prompts; returns its counters."""
    pending = None
    calls = 0
    # start from the learner's weights, not our own from_pretrained copy (they differ
    # when a checkpoint leaves some weights to random initialisation)
    payload = ray.get(coordinator.latest_weights.remote())
    if payload is not None:
        worker.load_weights(payload, force=True)
    while True:
        prompts, version = ray.get(coordinator.acquire.remote(worker.name, 5.0))
        if prompts is None:
            break
        if pending is not None and ray.wait([pending], timeout=0)[0]:
            ray.get(pending)  # surfaces a dead reward actor now, not as a timeout later
            pending = None
        if not prompts:
            continue
        if version > worker.policy_version:
            worker.load_weights(ray.get(coordinator.latest_weights.remote()))
        groups = worker.generate(prompts)
        if pending is not None:
            ray.get(pending)
        pending = reward_actors[calls % len(reward_actors)].score_and_put.remote(groups, coordinator)
        calls += 1
    if pending is not None:
        ray.get(pending)
    latest = ray.get(coordinator.latest_weights.remote())
    if latest is not None and latest.version > worker.policy_version:
        worker.load_weights(latest)  # end on the newest version
    return {"name": worker.name, "generate_calls": calls, "samples": worker.generated_samples,
            "policy_version": worker.policy_version}
