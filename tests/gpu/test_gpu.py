"""The GPU path: rollout and a learner step on CUDA in bf16, and collective weight
sync (NCCL between GPUs; gloo with CUDA tensors when ranks share a GPU).

Marked ``gpu`` and skipped without CUDA. Run them with
``bash tests/gpu/run_gpu_checks.sh`` on a GPU machine.

``FLEETRL_GPU_TESTS_DEVICE=cpu`` runs the tests that do not need a real GPU on
CPU in bf16 (a dry run of this file on a machine without one: the device is the
only thing faked; NCCL and shared-GPU tests skip).
"""

from __future__ import annotations

import io
import json
import math
import os

import pytest
import ray
import torch

from actors.weights.collective import CollectiveConfigError
from learner.driver.weight_sync import CollectiveSync
from actors.runtime.rollout_actor import create_rollout_actor
from actors.weights.flat import weights_digest
from actors.rollout.worker import RolloutConfig, RolloutWorker
from actors.types import Prompt
from learner.actor import create_learner
from learner.learner import Learner, LearnerConfig
from learner.driver.trainer import Trainer
from tests.test_collective_sync import other_policy  # noqa: F401 - fixture
from tests.test_pipeline import small_config

DEVICE = os.environ.get("FLEETRL_GPU_TESTS_DEVICE", "cuda")
REAL_GPU = DEVICE == "cuda"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(REAL_GPU and not torch.cuda.is_available(),
                       reason=f"needs CUDA: torch {torch.__version__} sees no GPU (bash tests/gpu/run_gpu_checks.sh "
                              f"on a GPU machine)"),
]
needs_two_gpus = pytest.mark.skipif(not REAL_GPU or torch.cuda.device_count() < 2,
                                    reason="NCCL needs one GPU per rank: 2 GPUs (NCCL refuses two ranks on one GPU)")
only_real_gpu = pytest.mark.skipif(not REAL_GPU, reason="needs a real GPU")


def gpus(n: float) -> float:
    return n if REAL_GPU else 0.0


def rollout_cfg(num_gpus: float = 1.0, **kw) -> RolloutConfig:
    return RolloutConfig(device=DEVICE, num_gpus=gpus(num_gpus), dtype="bfloat16", **kw)


def learner_cfg(num_gpus: float = 1.0, **kw) -> LearnerConfig:
    return LearnerConfig(device=DEVICE, num_gpus=gpus(num_gpus), dtype="bfloat16", **kw)


PROMPTS = [Prompt(uid=i, text=f"{1000 + 7 * i}=") for i in range(4)]


def scored(groups):
    for g in groups:
        for k, s in enumerate(g.samples):
            s.reward = float(k % 2)
    return groups


def test_rollout_generates_on_cuda_in_bf16(tiny_policy):
    w = RolloutWorker(tiny_policy, rollout_cfg(group_size=4, max_new_tokens=6), seed=0)
    p = next(w.model.parameters())
    assert (p.device.type, p.dtype) == (DEVICE, torch.bfloat16)
    assert all(b.device.type == DEVICE for b in w.flat.buffers.values())
    groups = w.generate(PROMPTS)
    assert len(groups) == 4 and all(len(g.samples) == 4 for g in groups)
    for g in groups:
        for s in g.samples:
            assert 1 <= len(s.completion_ids) <= 6 and len(s.logprobs) == len(s.completion_ids)
            assert all(math.isfinite(x) and x <= 1e-6 for x in s.logprobs)
            assert s.policy_version == 0


def test_learner_step_on_cuda_and_weights_reach_a_bf16_worker(ray_session, tiny_policy):
    from actors.runtime import object_store

    w = RolloutWorker(tiny_policy, rollout_cfg(group_size=4, max_new_tokens=6), seed=0,
                      fetch_weights=object_store.fetch)
    learner = Learner(tiny_policy, learner_cfg(lr=1e-2), total_steps=10, publish_dtype="bfloat16",
                      put_weights=object_store.put)
    p = next(learner.model.parameters())
    assert (p.device.type, p.dtype) == (DEVICE, torch.float32)  # fp32 master weights
    ids = torch.tensor([[3, 4, 5, 6]], device=DEVICE)
    # bf16 autocast: logits stay bf16 (the loss upcasts only the gathered completion positions)
    assert learner.model(input_ids=ids).logits.dtype == torch.bfloat16
    before = learner.param_vector()
    m = learner.train_step(scored(w.generate(PROMPTS)))
    assert learner.policy_version == 1 and math.isfinite(m["loss"]) and m["grad_norm"] > 0
    assert not torch.equal(before, learner.param_vector())
    # behaviour (bf16 weights) and learner (bf16 autocast over fp32 masters) agree before the step
    assert m["ratio_mean"] == pytest.approx(1.0, abs=0.1)
    wire = learner.publisher.wire()
    assert list(wire) == ["torch.bfloat16"] and next(iter(wire.values())).device.type == DEVICE
    payload = learner.publish_weights()  # object store path from a CUDA learner to a CUDA worker
    assert w.load_weights(payload) and w.policy_version == 1
    assert weights_digest(w.flat) == learner.weights_digest()
    (g,) = w.generate(PROMPTS[:1])
    assert g.samples[0].policy_version == 1


def _pair(tiny_policy, other_policy, num_gpus: float):
    learner = create_learner(tiny_policy, learner_cfg(num_gpus, num_cpus=0.1, lr=1e-2), total_steps=10,
                             publish_dtype="bfloat16")
    reader = create_rollout_actor(other_policy, rollout_cfg(num_gpus, num_cpus=0.1, group_size=4, max_new_tokens=4),
                                  name="r0", seed=0, default_max_new_tokens=4)
    return learner, reader


def _sync_and_check(learner, reader, backend: str) -> CollectiveSync:
    groups = scored(ray.get(reader.generate.remote(PROMPTS)))
    ray.get(learner.train_step.remote(groups))
    sync = CollectiveSync(learner, backend=backend, timeout_s=30, startup_timeout_s=120)
    payload = sync.publish({"r0": reader})
    assert payload.version == 1 and not payload.refs
    assert ray.get(reader.policy_version.remote()) == 0
    assert ray.get(reader.load_weights.remote(payload)) is True
    assert ray.get(reader.weights_digest.remote()) == ray.get(learner.weights_digest.remote())  # bit for bit
    return sync


def test_collective_sync_between_actors_sharing_one_gpu(ray_session, tiny_policy, other_policy):  # noqa: F811
    """num_gpus=0.5 each: NCCL cannot put two ranks on one GPU, so auto picks gloo,
    which moves the CUDA buffers through host memory."""
    learner, reader = _pair(tiny_policy, other_policy, 0.5)
    try:
        shared = ray.get(learner.sync_device.remote())["gpu"] == ray.get(reader.sync_device.remote())["gpu"]
        sync = _sync_and_check(learner, reader, "auto")
        assert sync.backend == ("gloo" if shared or not REAL_GPU else "nccl")
    finally:
        ray.kill(learner)
        ray.kill(reader)


@only_real_gpu
def test_forced_nccl_on_a_shared_gpu_is_refused_clearly(ray_session, tiny_policy, other_policy):  # noqa: F811
    learner, reader = _pair(tiny_policy, other_policy, 0.5)
    try:
        if ray.get(learner.sync_device.remote())["gpu"] != ray.get(reader.sync_device.remote())["gpu"]:
            pytest.skip("Ray placed the two 0.5-GPU actors on different GPUs")
        with pytest.raises(CollectiveConfigError, match="nccl cannot put two ranks on one GPU"):
            CollectiveSync(learner, backend="nccl", timeout_s=30).publish({"r0": reader})
    finally:
        ray.kill(learner)
        ray.kill(reader)


@needs_two_gpus
def test_nccl_broadcast_between_two_gpus(ray_session, tiny_policy, other_policy):  # noqa: F811
    learner, reader = _pair(tiny_policy, other_policy, 1.0)
    try:
        sync = _sync_and_check(learner, reader, "nccl")
        assert sync.backend == "nccl"
        # a second version over the same communicator
        ray.get(learner.train_step.remote(scored(ray.get(reader.generate.remote(PROMPTS)))))
        payload = sync.publish({"r0": reader})
        assert payload.version == 2 and sync.epoch == 1
        assert ray.get(reader.load_weights.remote(payload)) is True
        assert ray.get(reader.weights_digest.remote()) == ray.get(learner.weights_digest.remote())
    finally:
        ray.kill(learner)
        ray.kill(reader)


def test_training_run_on_cuda_with_collective_sync(ray_session, tiny_policy, tmp_path):
    """The learner and 2 rollout workers share one GPU (0.5 + 2 x 0.25)."""
    cfg = small_config(tiny_policy, "--rollout.num_workers", "2", "--train.weight_sync", "collective", "--train.max_staleness", "0",
                       "--learner.lr", "1e-2", "--learner.device", DEVICE, "--learner.num_gpus", str(gpus(0.5)),
                       "--learner.dtype", "bfloat16", "--rollout.device", DEVICE, "--rollout.dtype", "bfloat16",
                       "--rollout.num_gpus", str(gpus(0.25)), "--rollout.num_cpus", "0.2")
    t = Trainer(cfg, tmp_path / "run", out=io.StringIO(), progress=False)
    try:
        summary = t.train()
        learner_digest = ray.get(t.learner.weights_digest.remote())
        actors = t.rollouts.actors
        final = [a for a, v in zip(actors, ray.get([a.policy_version.remote() for a in actors])) if v == 6]
        assert ray.get([a.weights_digest.remote() for a in final]) == [learner_digest] * len(final)
    finally:
        t.shutdown()
    assert summary["steps"] == summary["final_policy_version"] == 6
    assert summary["weight_sync_fallbacks"] == 0 and summary["weight_sync_broadcasts"] == 7
    assert summary["produced"] == summary["trained"] + summary["dropped"]


@only_real_gpu
def test_training_run_on_cuda_with_the_vllm_engine(ray_session, warm_policy, tmp_path):
    """One vLLM worker (bf16, in-process engine) and the learner share one GPU; weights are
    broadcast into the engine. Reports the bf16 rollout-training mismatch it measures."""
    from actors.rollout.engines.vllm import vllm_unavailable

    if vllm_unavailable():
        pytest.skip(f"the vLLM engine cannot run here: {vllm_unavailable()}")
    cfg = small_config(warm_policy, "--rollout.engine", "vllm", "--rollout.num_workers", "1",
                       "--rollout.num_gpus", "0.5", "--rollout.vllm.gpu_memory_utilization", "0.3",
                       "--rollout.dtype", "bfloat16", "--learner.num_gpus", "0.5", "--learner.dtype", "bfloat16",
                       "--train.weight_sync", "collective", "--train.max_staleness", "0", "--train.steps", "8",
                       "--rollout.max_new_tokens", "8")
    t = Trainer(cfg, tmp_path / "run", out=io.StringIO(), progress=False)
    try:
        summary = t.train()
        (actor,) = t.rollouts.actors
        info = ray.get(actor.engine_info.remote())
        assert info["engine"] == "vllm" and info["device"].startswith("cuda") and info["dtype"] == "bfloat16"
        assert info["policy_version"] == 8 and info["reloads"] > 1
    finally:
        t.shutdown()
    assert summary["produced"] == summary["trained"] + summary["dropped"]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in rows if r["mismatch_tokens"]]
    assert measured and all(math.isfinite(r["mismatch_abs_mean"]) for r in measured)
    print("bf16 mismatch |dlogp| mean/max per step:",
          [(round(r["mismatch_abs_mean"], 4), round(r["mismatch_abs_max"], 3)) for r in measured])
