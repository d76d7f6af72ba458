"""Learner ranks (``learner.num_workers``): FSDP2 over 2 CPU ranks (gloo) as real Ray actors.

What must hold: N ranks compute the update one rank computes; checkpoints move between
rank counts; a run with 2 ranks keeps exact accounting and the workers get its weights;
a rank that dies fails the run naming it, within the ranks' timeout."""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time

import pytest
import ray
import torch

from actors.rollout.worker import RolloutConfig, RolloutWorker
from actors.types import Prompt
from learner.actor import start_learner
from learner.learner import Learner, LearnerConfig
from tests.conftest import wait_for
from tests.test_pipeline import small_config

TEXTS = ("12=", "98765=", "4=")  # prompts of different lengths: the token balance matters


def batches(policy: str, n: int) -> list:
    """``n`` batches of 3 groups x 3 samples, rewards differing within each group."""
    w = RolloutWorker(policy, RolloutConfig(group_size=3, max_new_tokens=6), seed=5)
    out = []
    for step in range(n):
        groups = w.generate([Prompt(uid=10 * step + i, text=t) for i, t in enumerate(TEXTS)])
        for g in groups:
            for i, s in enumerate(g.samples):
                s.reward = float(i == step % 3)
        out.append(groups)
    return out


def config(**kw) -> LearnerConfig:
    # micro-batches of 2: 9 rows split 5/4 take 3 and 2 passes, so one rank runs a placeholder pass
    return LearnerConfig(num_threads=1, lr=2e-2, micro_batch_size=2, num_cpus=0.1, rank_timeout_s=60, **kw)


@pytest.mark.parametrize("options", [
    {"loss_agg": "token-mean"},
    # every other path with collectives: a sharded KL reference, proximal log-probs (decoupled),
    # two optimizer steps per batch, the entropy term
    {"loss_agg": "seq-mean-token-sum", "kl_coef": 0.1, "off_policy": "decoupled", "mini_batches": 2,
     "entropy_coef": 0.01},
], ids=["token-mean", "seq-mean-token-sum+kl+decoupled+minibatches+entropy"])
def test_two_ranks_compute_the_update_one_rank_computes(ray_session, tiny_policy, options):
    steps = batches(tiny_policy, 3)
    one = Learner(tiny_policy, config(**options), total_steps=10)
    two = start_learner(tiny_policy, config(num_workers=2, **options), total_steps=10)
    try:
        start = ray.get(two.rank0.param_vector.remote())
        assert torch.equal(start, one.param_vector())
        for groups in steps:
            m1 = one.train_step(groups)
            m2 = ray.get(two.rank0.train_step.remote(groups), timeout=120)
            assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-4, abs=1e-6)
            assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-4)
            assert m2["ratio_max"] == pytest.approx(m1["ratio_max"], rel=1e-5)
            assert m2["active_samples"] == m1["active_samples"] > 0
            expected = {k for k in ("kl", "entropy") if f"{k}_coef" in options}  # the terms this case turns on
            assert {k for k in ("kl", "entropy") if m1.get(k) is not None} == expected
            assert {k for k in ("kl", "entropy") if m2.get(k) is not None} == expected
            for key in expected:
                assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-7)
        after = ray.get(two.rank0.param_vector.remote())  # rank 0's gathered copy: what it publishes
        assert not torch.equal(after, start)
        # fp32 sums in another order, amplified by AdamW where a gradient is near 0: ~1e-5 after 3 steps.
        # (Adam hides a gradient's scale; the grad_norm check above is what catches a mean-not-sum.)
        assert torch.allclose(after, one.param_vector(), atol=5e-5), (after - one.param_vector()).abs().max()
        where = ray.get(two.rank0.ranks_where.remote())
        assert len({w["pid"] for w in where}) == 2 and all(w["peak_rss_mib"] > 0 for w in where)
    finally:
        two.kill()


def test_a_checkpoint_of_two_ranks_resumes_on_one_and_on_two(ray_session, tiny_policy, tmp_path):
    """2 ranks write a checkpoint (each its shard of AdamW's state); 1 rank resumes it and takes
    the step the 2 ranks took next; that rank's own checkpoint resumes on 2 ranks again
    (resharding both ways) and the step matches too."""
    first, second = batches(tiny_policy, 2)
    two = start_learner(tiny_policy, config(num_workers=2), total_steps=10)
    try:
        ray.get(two.rank0.train_step.remote(first), timeout=120)
        ray.get(two.rank0.save_state.remote(str(tmp_path / "ckpt")), timeout=120)
        ray.get(two.rank0.train_step.remote(second), timeout=120)
        expected = ray.get(two.rank0.param_vector.remote())
    finally:
        two.kill()
    shards = sorted((tmp_path / "ckpt" / "optimizer").glob("*.safetensors"))
    sizes = [f.stat().st_size for f in shards]
    assert len(shards) == 2 and max(sizes) < 0.7 * sum(sizes), sizes  # each rank wrote its own half
    one = Learner(tiny_policy, config(), total_steps=10)
    assert one.load_state(str(tmp_path / "ckpt")) == 1
    one.save_state(str(tmp_path / "ckpt-one"))  # what 1 rank restored, written by 1 rank
    one.train_step(second)  # the same step from the restored weights and AdamW moments
    assert torch.allclose(one.param_vector(), expected, atol=5e-5)
    again = start_learner(tiny_policy, config(num_workers=2), total_steps=10)  # resharded onto 2 ranks
    try:
        assert ray.get(again.rank0.load_state.remote(str(tmp_path / "ckpt-one")), timeout=120) == 1
        ray.get(again.rank0.train_step.remote(second), timeout=120)
        assert torch.allclose(ray.get(again.rank0.param_vector.remote()), expected, atol=5e-5)
    finally:
        again.kill()


def test_a_damaged_or_foreign_optimizer_shard_is_a_one_line_error(tiny_policy, tmp_path):
    """The optimizer's safetensors shard replaced by junk, or by the shard of a policy of another
    shape: resuming fails with one line naming the checkpoint, not DCP's traceback."""
    from learner.checkpoint import CheckpointError

    learner = Learner(tiny_policy, config(), total_steps=10)
    learner.train_step(batches(tiny_policy, 1)[0])
    learner.save_state(str(tmp_path / "ckpt"))
    (shard,) = (tmp_path / "ckpt" / "optimizer").glob("*.safetensors")
    good = shard.read_bytes()
    shard.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError) as junk:
        Learner(tiny_policy, config(), total_steps=10).load_state(str(tmp_path / "ckpt"))
    from safetensors.torch import load, save

    shard.write_bytes(save({k: v[..., :1].contiguous() if v.dim() else v for k, v in load(good).items()}))
    with pytest.raises(CheckpointError) as foreign:
        Learner(tiny_policy, config(), total_steps=10).load_state(str(tmp_path / "ckpt"))
    for e in (junk, foreign):
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"checkpoint {tmp_path / 'ckpt'}: its optimizer state"), msg


def test_a_checkpoint_of_an_older_fleetrl_still_resumes(tiny_policy, tmp_path):
    """Before the sharded format, AdamW's state sat inside learner_state.pt, keyed by index: such a
    checkpoint resumes on one rank and the next step is the one the saving learner takes."""
    import shutil

    from learner.checkpoint import LEARNER_STATE

    first, second = batches(tiny_policy, 2)
    learner = Learner(tiny_policy, config(), total_steps=10)
    learner.train_step(first)
    learner.save_state(str(tmp_path / "ckpt"))
    state = torch.load(tmp_path / "ckpt" / LEARNER_STATE, weights_only=True)
    state["optimizer"] = learner.optimizer.state_dict()  # the old layout
    torch.save(state, tmp_path / "ckpt" / LEARNER_STATE)
    shutil.rmtree(tmp_path / "ckpt" / "optimizer")
    learner.train_step(second)
    resumed = Learner(tiny_policy, config(), total_steps=10)
    assert resumed.load_state(str(tmp_path / "ckpt")) == 1
    resumed.train_step(second)
    assert torch.equal(resumed.param_vector(), learner.param_vector())


def test_a_run_on_two_ranks_fails_naming_a_killed_rank_and_keeps_accounting(ray_session, tiny_policy, tmp_path):
    """A whole run on 2 ranks; rank 1 is killed -9 once two steps are done: the run ends naming
    rank 1 within the ranks' timeout, and what it produced is still accounted for."""
    from learner.driver.trainer import RunFailed, Trainer

    cfg = small_config(tiny_policy, "--learner.num_workers", "2", "--learner.num_cpus", "0.2", "--train.steps", "100000",
                       "--train.max_wall_s", "300", "--learner.rank_timeout_s", "30")
    t = Trainer(cfg, tmp_path / "run", out=io.StringIO(), progress=False)
    killed: dict = {}

    def kill_rank_1():
        wait_for(lambda: getattr(t, "step", 0) >= 2, timeout_s=120, what="two steps")
        where = ray.get([a.where.remote() for a in t.learner_ranks.actors])
        killed["pids"] = {w["pid"] for w in where}
        os.kill(where[1]["pid"], signal.SIGKILL)
        killed["at"] = time.monotonic()

    threading.Thread(target=kill_rank_1, daemon=True).start()
    try:
        with pytest.raises(RunFailed, match="learner rank 1"):
            t.train()
        assert time.monotonic() - killed["at"] < 60  # the ranks' timeout (30 s) bounds it
        assert len(killed["pids"]) == 2  # two processes, not one rank twice
    finally:
        t.shutdown()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "learner rank 1" in summary["reason"]
    assert summary["steps"] >= 2 and summary["produced"] == summary["trained"] + summary["dropped"]
