"""Collective weight sync (``actors.weights.collective``) for real: gloo process groups
between real Ray actors (the learner and rollout workers), on CPU.

The same code runs NCCL between GPUs; that part is in ``tests/gpu``.
"""

from __future__ import annotations

import io
import time

import pytest
import ray
import torch

from actors.weights.collective import CollectiveConfigError, CollectiveSyncError, GroupSpec, choose_backend
from learner.driver.weight_sync import CollectiveSync
from actors.runtime.rollout_actor import create_rollout_actor
from actors.runtime.placement import bundle
from actors.rollout.worker import RolloutConfig
from actors.types import Prompt
from learner.config import ConfigError, load_config
from learner.actor import create_learner
from learner.learner import LearnerConfig
from learner.driver.trainer import Trainer
from tests.test_pipeline import assert_workers_end_on_the_learners_weights, read_metrics, small_config

TIMEOUT_S = 5.0


@pytest.fixture(scope="module")
def other_policy(tmp_path_factory) -> str:
    """The tiny policy's architecture with other random weights: readers start from
    these, so equal digests after a sync prove the bytes moved."""
    from actors.models.tiny import build_char_tokenizer, build_tiny_llama

    path = tmp_path_factory.mktemp("other-policy")
    tok = build_char_tokenizer()
    build_tiny_llama(len(tok), hidden_size=32, num_layers=1, num_heads=2, max_positions=16, seed=1).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def reader(policy: str, name: str):
    return create_rollout_actor(policy, RolloutConfig(num_cpus=0.05, group_size=4, max_new_tokens=4), name=name,
                                seed=0, default_max_new_tokens=4)


def train_step(learner, actor) -> int:
    """One real learner step on groups the reader generated (alternating rewards)."""
    groups = ray.get(actor.generate.remote([Prompt(uid=i, text=f"{1000 + i}=") for i in range(4)]))
    for g in groups:
        for k, s in enumerate(g.samples):
            s.reward = float(k % 2)
    ray.get(learner.train_step.remote(groups))
    return ray.get(learner.publish_weights.remote()).version


def digests(actors) -> list[str]:
    return ray.get([a.weights_digest.remote() for a in actors])


def test_broadcast_is_exact_and_survives_membership_changes_and_a_dead_reader(ray_session, tiny_policy,
                                                                              other_policy):
    # every actor starts at once (model loading overlaps)
    learner = create_learner(tiny_policy, LearnerConfig(num_cpus=0.05, lr=1e-2), total_steps=10)
    r0, r1 = reader(other_policy, "r0"), reader(other_policy, "r1")
    try:
        with pytest.raises(CollectiveConfigError, match="nccl needs every rank on CUDA"):
            CollectiveSync(learner, backend="nccl", timeout_s=TIMEOUT_S).build({})
        sync = CollectiveSync(learner, timeout_s=TIMEOUT_S, startup_timeout_s=60)
        start = digests([r0])[0]
        assert train_step(learner, r0) == 1
        learner_digest = ray.get(learner.weights_digest.remote())
        assert learner_digest != start

        payload = sync.publish({"r0": r0})
        assert (payload.version, payload.refs, sync.epoch, sync.backend) == (1, {}, 1, "gloo")
        # staged, not applied: a worker reports a version only once its parameters are that version
        assert ray.get(r0.policy_version.remote()) == 0 and digests([r0]) == [start]
        assert ray.get(r0.load_weights.remote(payload)) is True
        assert ray.get(r0.policy_version.remote()) == 1 and digests([r0]) == [learner_digest]  # bit for bit
        assert ray.get(r0.load_weights.remote(payload)) is False  # already held

        # a worker outside the group cannot apply a refs-less payload: it says why
        with pytest.raises(ray.exceptions.RayTaskError, match="r1: weights of version 1 were broadcast to a "
                                                              "collective group this worker is not in"):
            ray.get(r1.load_weights.remote(payload))
        # scale up: a new group with the newcomer, which gets the current version
        payload = sync.publish({"r0": r0, "r1": r1})
        assert sync.epoch == 2 and payload.version == 1
        assert ray.get([r1.load_weights.remote(payload), r0.load_weights.remote(payload)]) == [True, False]
        assert digests([r0, r1]) == [learner_digest] * 2

        # scale down: r1 leaves; the next version goes to a group without it
        assert train_step(learner, r0) == 2
        payload = sync.publish({"r0": r0})
        assert sync.epoch == 3 and payload.version == 2
        assert ray.get(r0.load_weights.remote(payload)) is True
        assert ray.get(r1.policy_version.remote()) == 1  # r1 got nothing
        learner_digest = ray.get(learner.weights_digest.remote())
        assert digests([r0]) == [learner_digest] != digests([r1])
        # and joins again (it left its old group behind)
        payload = sync.publish({"r0": r0, "r1": r1})
        assert sync.epoch == 4 and ray.get(r1.load_weights.remote(payload)) is True
        assert digests([r1]) == [learner_digest]

        # a member dies without the driver knowing: a clear error naming it, not a hang
        ray.kill(r1)
        assert train_step(learner, r0) == 3
        t0 = time.monotonic()
        with pytest.raises(CollectiveSyncError, match=r"weight sync broadcast failed .*r1 \(member\): .*Actor"):
            sync.publish({"r0": r0, "r1": r1})
        assert time.monotonic() - t0 < TIMEOUT_S + 10
        assert sync.broken
        assert ray.get(r0.policy_version.remote()) == 2  # nothing applied behind the driver's back
        # the fallback: version 3 through the object store reaches r0 all the same
        fallback = ray.get(learner.publish_weights.remote())
        assert fallback.version == 3 and fallback.refs
        assert ray.get(r0.load_weights.remote(fallback)) is True
        assert digests([r0]) == [ray.get(learner.weights_digest.remote())]
        # and the next sync rebuilds with the survivor
        assert train_step(learner, r0) == 4
        payload = sync.publish({"r0": r0})
        assert sync.epoch == 5 and payload.version == 4
        assert ray.get(r0.load_weights.remote(payload)) is True
        assert digests([r0]) == [ray.get(learner.weights_digest.remote())]

        # a rank that never shows up for the rendezvous: the join times out with an error
        host, port = ray.get(learner.sync_open_store.remote())
        fp = ray.get(learner.sync_device.remote())["fingerprint"]
        spec = GroupSpec(epoch=99, host=host, port=port, world_size=2, backend="gloo", timeout_s=2.0, fingerprint=fp)
        t0 = time.monotonic()
        with pytest.raises(ray.exceptions.RayTaskError):
            ray.get(learner.sync_join.remote(spec, 0), timeout=30)
        assert time.monotonic() - t0 < 20
    finally:
        for a in (learner, r0, r1):
            ray.kill(a)


def test_a_failed_broadcast_leaves_the_worker_on_its_weights(ray_session, tiny_policy, other_policy):
    """A broadcast that fails (here: rank 0, the learner, is killed while the worker waits
    in the broadcast for its bytes; or, if the kill wins the race, before the worker
    enters it) invalidates the worker's staging copy; until the trainer's object-store
    fallback arrives, the refs-less payload of that version must not crash the worker's
    loop: it keeps the weights it had, bit for bit. All of it real: a gloo group of Ray
    actors and ``ray.kill``."""
    from actors.weights.payload import Payload

    learner = create_learner(tiny_policy, LearnerConfig(num_cpus=0.05, lr=1e-2), total_steps=10)
    r0 = reader(other_policy, "r0")
    try:
        sync = CollectiveSync(learner, timeout_s=TIMEOUT_S, startup_timeout_s=60)
        assert train_step(learner, r0) == 1
        assert ray.get(r0.load_weights.remote(sync.publish({"r0": r0}))) is True  # a good broadcast first
        held = digests([r0])[0]
        assert held == ray.get(learner.weights_digest.remote())
        assert train_step(learner, r0) == 2
        fingerprint = ray.get(r0.sync_device.remote())["fingerprint"]

        receive = r0.sync_receive.remote(sync.epoch)  # waits for rank 0, which never sends
        ray.kill(learner)
        t0 = time.monotonic()
        with pytest.raises(ray.exceptions.RayTaskError, match=r"(?i)connection (closed|reset)|timed out"):
            ray.get(receive, timeout=TIMEOUT_S + 30)
        assert time.monotonic() - t0 < TIMEOUT_S + 30
        assert ray.get(r0.load_weights.remote(Payload(version=2, fingerprint=fingerprint, refs={}))) is False
        assert ray.get(r0.policy_version.remote()) == 1 and digests([r0]) == [held]
    finally:
        for a in (learner, r0):
            ray.kill(a)


def test_a_receiver_refuses_another_layout(tiny_policy, other_policy):
    from transformers import AutoModelForCausalLM

    from actors.weights.collective import StagedReceiver
    from actors.weights.flat import FlatParams

    fp32 = FlatParams(AutoModelForCausalLM.from_pretrained(tiny_policy))
    bf16 = StagedReceiver(FlatParams(AutoModelForCausalLM.from_pretrained(other_policy, dtype=torch.bfloat16)), "r0")
    # what a learner publishing fp32 master weights cast to bf16 announces matches a bf16 worker ...
    assert fp32.fingerprint_as(torch.bfloat16) == bf16.flat.fingerprint != fp32.fingerprint
    spec = GroupSpec(epoch=1, host="127.0.0.2", port=1, world_size=2, backend="gloo", timeout_s=1.0,
                     fingerprint=fp32.fingerprint)
    with pytest.raises(CollectiveConfigError, match="r0: weight layout .* differs from the learner's"):
        bf16.join(spec, 1)  # ... and the uncast one does not: refused before any connection


def test_backend_choice():
    cpu = {"device": "cpu", "gpu": None}
    g0, g1 = {"device": "cuda", "gpu": "GPU-0"}, {"device": "cuda", "gpu": "GPU-1"}
    assert choose_backend("auto", {"learner": cpu, "r0": g0}) == "gloo"
    assert choose_backend("auto", {"learner": g0, "r0": g0}) == "gloo"  # one GPU: NCCL cannot
    assert choose_backend("gloo", {"learner": g0, "r0": g1}) == "gloo"
    with pytest.raises(CollectiveConfigError, match="two ranks on one GPU.*learner, r0"):
        choose_backend("nccl", {"learner": g0, "r0": g0})
    # the placement-group bundle of a GPU worker asks for the GPU
    assert bundle(0.4, 0.5, {"rollout": 1}) == {"CPU": 0.4, "GPU": 0.5, "rollout": 1}


def test_device_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"^learner\.device: cuda needs learner\.num_gpus > 0"):
        load_config(None, ["--learner.device", "cuda"])
    with pytest.raises(ConfigError, match=r"^rollout\.device: cuda needs rollout\.num_gpus > 0"):
        load_config(None, ["--rollout.device", "cuda"])
    with pytest.raises(ConfigError, match=r"^rollout\.dtype"):
        load_config(None, ["--rollout.dtype", "float16"])
    with pytest.raises(ConfigError, match=r"^train\.weight_sync_backend: nccl needs the learner on CUDA"):
        load_config(None, ["--train.weight_sync", "collective", "--train.weight_sync_backend", "nccl"])
    cfg = load_config(None, ["--learner.num_gpus", "1", "--rollout.num_gpus", "0.5"])  # auto -> cuda
    assert (cfg.learner.device, cfg.rollout.device) == ("auto", "auto")


class ScalingCollectiveTrainer(Trainer):
    """2 workers; at step 2 a third joins; at step 4 rollout-0 is killed (and replaced)."""

    def update(self, batch):
        for g in ray.get(batch):  # the batch is an object ref
            self.seen.append((g.worker, g.policy_version))
        m = super().update(batch)
        if self.submitted == 2:
            self.rollouts.request_scale(3)
        if self.submitted == 4:
            ray.kill(self.rollouts.workers["rollout-0"].actor, no_restart=True)
        return m

    def setup(self):
        self.seen = []
        super().setup()


def test_training_run_with_collective_sync(ray_session, tiny_policy, tmp_path):
    cfg = small_config(tiny_policy, "--rollout.num_workers", "2", "--train.weight_sync", "collective", "--train.weight_sync_timeout_s", "10",
                       "--train.sample_timeout_s", "60",
                       "--train.max_staleness", "0", "--learner.lr", "1e-2", "--train.steps", "8",
                       "--rollout.num_cpus", "0.2")
    t = ScalingCollectiveTrainer(cfg, tmp_path / "run", out=io.StringIO(), progress=False)
    try:
        try:
            summary = t.train()
        except Exception as e:
            raise AssertionError(f"run failed: {e}\n--- trainer output ---\n{t.out.getvalue()}") from e
        # the survivors (rollout-1, rollout-2 and rollout-3, which replaced rollout-0) ended on version 8,
        # broadcast to them, holding the learner's weights bit for bit
        assert sorted(t.rollouts.workers) == ["rollout-1", "rollout-2", "rollout-3"]
        assert_workers_end_on_the_learners_weights(t, 8)
    finally:
        t.shutdown()
    assert summary["steps"] == summary["final_policy_version"] == 8
    assert summary["weight_sync"] == "collective" and summary["weight_sync_backend"] == "gloo"
    assert summary["weight_sync_groups"] >= 2  # rebuilt after the membership changed
    assert summary["weight_sync_broadcasts"] + summary["weight_sync_fallbacks"] == 9  # setup + 8 steps
    assert summary["produced"] == summary["trained"] + summary["dropped"]
    rows = read_metrics(tmp_path)
    assert [r["behaviour_versions"] for r in rows] == [[i] for i in range(8)]  # on-policy throughout
    assert "rollout-2" in {w for w, _ in t.seen}, "the worker added at step 2 never delivered"
    assert "replaced by rollout-3" in t.out.getvalue()
