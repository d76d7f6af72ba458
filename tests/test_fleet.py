"""Rollout workers come and go while training runs: scaling and replacement."""

from __future__ import annotations

import io

import pytest
import ray

from learner.driver.trainer import RunFailed, Trainer
from tests.test_pipeline import run_trainer, small_config


class ScalingTrainer(Trainer):
    """Through the Control RPC: 2 -> 4 workers at step 3; once both new workers have
    delivered groups, 4 -> 1; then a few more steps and stop."""

    def scale(self, n: int) -> None:
        import grpc

        from protos import control_pb2, control_pb2_grpc

        stub = control_pb2_grpc.ControlStub(grpc.insecure_channel(self.control.address))
        reply = stub.ScaleRollout(control_pb2.ScaleRolloutRequest(num_workers=n), timeout=30)
        self.scaled_at[reply.target] = self.submitted

    def update(self, batch):
        for g in ray.get(batch):  # the batch is an object ref
            self.seen.append((g.worker, g.policy_version, self.submitted))
        m = super().update(batch)
        workers = {w for w, _, _ in self.seen}
        if self.submitted == 3:
            self.scale(4)
        elif 4 in self.scaled_at and 1 not in self.scaled_at and {"rollout-2", "rollout-3"} <= workers:
            self.scale(1)
        elif 1 in self.scaled_at and len(self.rollouts.workers) == 1 and self.submitted >= self.scaled_at[1] + 15:
            self.stop_requested.set()
        return m

    def setup(self):
        self.seen, self.scaled_at = [], {}
        super().setup()


def test_scale_up_then_down_during_a_run(ray_session, tiny_policy, tmp_path):
    cfg = small_config(tiny_policy, "--rollout.num_workers", "2", "--train.steps", "100000", "--train.max_wall_s", "240",
                       "--rollout.num_cpus", "0.2")
    t, summary = run_trainer(cfg, tmp_path, trainer_cls=ScalingTrainer)
    assert 1 in t.scaled_at, f"never scaled down: {t.scaled_at}, workers {set(w for w, _, _ in t.seen)}"
    assert summary["produced"] == summary["trained"] + summary["dropped"]
    up, down = t.scaled_at[4], t.scaled_at[1]
    for w, version, _ in t.seen:
        if w in ("rollout-2", "rollout-3"):  # started after version `up`: never older weights than that
            assert version >= up - 1, (w, version, up)
    late = {w for w, _, step in t.seen if step >= down + 8}
    assert late == {"rollout-0"}, f"after scaling to 1 only rollout-0 should deliver: {late}"
    assert list(t.rollouts.workers) == ["rollout-0"] and summary["dropped_by_reason"].get("duplicate", 0) == 0
    assert "retiring rollout-1, rollout-2, rollout-3" in t.out.getvalue()


class KillingTrainer(Trainer):
    def update(self, batch):
        m = super().update(batch)
        if self.submitted == 1:
            ray.kill(self.rollouts.workers["rollout-0"].actor, no_restart=True)
        return m


# a killed rollout worker replaced with exact accounting: tests/test_faults.py (one run kills a
# rollout worker and the reward worker)


def test_run_fails_clearly_when_no_replacement_is_allowed(ray_session, tiny_policy, tmp_path):
    cfg = small_config(tiny_policy, "--rollout.num_workers", "2", "--train.steps", "30", "--rollout.max_replacements", "0")
    with pytest.raises(RunFailed, match="rollout-0 failed .*max_replacements"):
        run_trainer(cfg, tmp_path, trainer_cls=KillingTrainer)


def test_unplaceable_workers_fail_with_the_resources_named(ray_session, tiny_policy, tmp_path):
    cfg = small_config(tiny_policy, "--rollout.resources", "{gpu_node: 1}", "--rollout.replace_timeout_s", "3")
    t = Trainer(cfg, tmp_path / "run", out=io.StringIO(), progress=False)
    try:
        with pytest.raises(RunFailed, match=r"not placed within 3s.*resources=\{'gpu_node': 1.0\}"):
            t.setup()
    finally:
        t.shutdown()


def test_placement_group_holds_every_actor(ray_session, tiny_policy, tmp_path):
    import json

    cfg = small_config(tiny_policy, "--train.placement", "strict_pack", "--train.steps", "4")
    t, summary = run_trainer(cfg, tmp_path)
    placement = json.loads((tmp_path / "run" / "placement.json").read_text())
    actors = [placement["learner"], *placement["rollout"], *placement["reward"]]
    assert len(actors) == 3  # the learner, small_config's one rollout worker, the reward worker
    assert len({a["placement_group"] for a in actors}) == 1 and actors[0]["placement_group"] == t.pg_id
    assert len({a["node_id"] for a in actors}) == 1  # strict_pack: one node
    assert summary["steps"] == 4


@ray.remote
class Hold:
    """Holds CPUs so that nothing else can take them."""

    def ready(self) -> bool:
        return True


class KillTheOnlyWorkerAndTakeItsCPUs(Trainer):
    """During step 1: kill the only rollout worker and, once its CPUs are free, take them
    with another actor, so that its replacement cannot be placed."""

    def setup(self):
        self.hold = None
        super().setup()
        # setup waits rollout.replace_timeout_s for the first actors to load their models; the
        # replacement gets a short one (read when the replacement is created)
        self.rollouts.cfg.replace_timeout_s = 3.0

    def update(self, batch):
        m = super().update(batch)
        if self.submitted == 0:
            ray.kill(self.rollouts.workers["rollout-0"].actor, no_restart=True)
            self.hold = Hold.options(num_cpus=self.cfg.rollout.num_cpus).remote()
            ray.get(self.hold.ready.remote(), timeout=60)  # placed: the dead worker's CPUs are taken
        return m


def test_run_fails_clearly_when_no_worker_is_alive_and_no_replacement_starts(ray_session, tiny_policy, tmp_path):
    # 2 CPUs: learner 0.5 + reward 0.2 + the worker's 1.0; after the kill, Hold takes that 1.0
    cfg = small_config(tiny_policy, "--rollout.num_workers", "1", "--rollout.num_cpus", "1.0",
                       "--learner.num_cpus", "0.5")
    t = KillTheOnlyWorkerAndTakeItsCPUs(cfg, tmp_path / "run", out=io.StringIO(), progress=False)
    try:
        with pytest.raises(RunFailed, match=r"rollout-0 failed .*; no rollout worker is alive and no replacement "
                                             r"started within rollout\.replace_timeout_s=3\.0s: GetTimeoutError"):
            t.train()
        assert t.step == 1 and t.rollouts.replacements == 1 and not t.rollouts.workers
    finally:
        t.shutdown()
        if t.hold is not None:
            ray.kill(t.hold)
