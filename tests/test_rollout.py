"""Rollout worker built directly (no Ray): groups, log-probs, EOS, context limits."""

import pytest
import torch

from actors.rollout.worker import RolloutConfig, RolloutWorker
from actors.types import Exclusion, Prompt
from actors.weights.flat import FlatParams
from actors.weights.object_store import WeightReceiver
from learner.batch import TrainBatch, pad_micro_batch
from learner.learner import Learner, LearnerConfig


def prompts(*texts):
    return [Prompt(uid=i, text=t, metadata={"answer": t[:-1][::-1]}) for i, t in enumerate(texts)]


def test_groups_and_behaviour_logprobs(tiny_policy):
    w = RolloutWorker(tiny_policy, RolloutConfig(group_size=5, max_new_tokens=6), name="r0", seed=1)
    groups = w.generate(prompts("12=", "98765="))
    assert [len(g.samples) for g in groups] == [5, 5]
    eos = w.tokenizer.eos_token_id
    lengths = set()
    for g in groups:
        assert g.prompt_ids == w.tokenizer(g.prompt.text)["input_ids"]
        for s in g.samples:
            assert s.policy_version == 0 and g.worker == "r0"
            assert len(s.logprobs) == len(s.completion_ids) >= 1
            assert all(lp <= 0 for lp in s.logprobs)
            assert len(s.completion_ids) <= 6
            assert s.finished == (s.completion_ids[-1] == eos)
            if eos in s.completion_ids:  # generation stops at the first EOS
                assert s.completion_ids.index(eos) == len(s.completion_ids) - 1
            lengths.add(len(s.completion_ids))
    assert len(lengths) > 1, "expected some samples to stop at EOS before max_new_tokens"


def test_behaviour_logprobs_equal_learner_recompute(tiny_policy):
    """The learner must see ratio == 1 on fresh samples: same positions, same masking."""
    cfg = RolloutConfig(group_size=4, max_new_tokens=6, temperature=0.7)
    w = RolloutWorker(tiny_policy, cfg, seed=3)
    groups = w.generate(prompts("1=", "4321=", "555555="))
    for g in groups:
        for s in g.samples:
            s.reward = 0.0
    learner = Learner(tiny_policy, LearnerConfig(num_threads=1, micro_batch_size=5), total_steps=1, temperature=0.7)
    batch = TrainBatch.from_groups(groups)
    recomputed = learner.proximal_logprobs(batch)  # the learner's own forward, masking and temperature
    behaviour = [s.logprobs for g in groups for s in g.samples]
    assert len(recomputed) == len(behaviour) == 12 and sum(map(len, behaviour)) > 12
    for lp, old in zip(recomputed, behaviour):
        assert len(lp) == len(old) and lp == pytest.approx(old, abs=1e-4)
    ids, attn, pos, targets, _, _, keep = pad_micro_batch(batch, list(range(12)), learner.pad_id, "cpu")
    logits, _ = learner._completion_logprobs(learner.model, ids, attn, pos, keep, targets)
    assert logits.shape[:2] == targets.shape == (12, 6)  # logits at completion positions only, not [b, L, V]


def test_learner_dtype_auto_and_bf16_keep_fp32_master_weights(tiny_policy):
    """auto computes (and generates) the built-in size of policy in fp32 on every CPU (its log-probs stay exact);
    bf16 on request computes in bf16 and keeps fp32 weights and AdamW state. Which CPUs pick bf16
    for big policies is read from /proc/cpuinfo (``cpu_bf16_flags``)."""
    from actors.device import BF16_CPU_MIN_PARAMS, auto_dtype, cpu_bf16_flags

    assert Learner(tiny_policy, LearnerConfig(num_threads=1), total_steps=1).compute_dtype == torch.float32
    assert auto_dtype("auto", "cpu", BF16_CPU_MIN_PARAMS) == ("bfloat16" if cpu_bf16_flags() else "float32")
    assert auto_dtype("auto", "cpu", BF16_CPU_MIN_PARAMS - 1) == "float32"
    assert auto_dtype("float32", "cpu", BF16_CPU_MIN_PARAMS) == "float32"
    assert auto_dtype("auto", "cuda", 1) == "bfloat16"
    w = RolloutWorker(tiny_policy, RolloutConfig(group_size=4, max_new_tokens=6), seed=3)
    assert w.dtype == torch.float32 and {p.dtype for p in w.model.parameters()} == {torch.float32}
    groups = w.generate(prompts("1=", "4321="))
    for g in groups:
        for k, s in enumerate(g.samples):
            s.reward = float(k % 2)
    learner = Learner(tiny_policy, LearnerConfig(num_threads=1, dtype="bfloat16"), total_steps=1)
    batch = TrainBatch.from_groups(groups)
    ids, attn, pos, targets, _, _, keep = pad_micro_batch(batch, list(range(8)), learner.pad_id, "cpu")
    with torch.no_grad():
        logits, _ = learner._completion_logprobs(learner.model, ids, attn, pos, keep, targets)
    assert logits.dtype == torch.bfloat16
    learner.train_step(groups)
    assert {p.dtype for p in learner.model.parameters()} == {torch.float32}
    assert {t.dtype for st in learner.optimizer.state.values() for t in st.values() if t.dim()} == {torch.float32}


def test_prompt_longer_than_context_is_excluded_not_generated(tiny_policy):
    w = RolloutWorker(tiny_policy, RolloutConfig(group_size=3, max_new_tokens=4))  # context is 16
    long = "1" * 14 + "="
    g_ok, g_long = w.generate(prompts("12=", long))
    assert all(s.excluded is None for s in g_ok.samples)
    assert g_long.excluded.kind is Exclusion.PROMPT_TOO_LONG and len(g_long.samples) == 3
    assert all(not s.trainable and s.completion_ids == [] for s in g_long.samples)


def test_greedy_is_deterministic(tiny_policy):
    w = RolloutWorker(tiny_policy, RolloutConfig(group_size=3, temperature=0.0, max_new_tokens=5))
    (g,) = w.generate(prompts("321="))
    assert len({tuple(s.completion_ids) for s in g.samples}) == 1


def test_weights_applied_change_logprobs_and_version(tiny_policy, ray_session):
    cfg = RolloutConfig(group_size=2, temperature=0.0, max_new_tokens=4)
    from actors.runtime import object_store

    w = RolloutWorker(tiny_policy, cfg, fetch_weights=object_store.fetch)
    (before,) = w.generate(prompts("12="))
    learner = Learner(tiny_policy, LearnerConfig(num_threads=1), total_steps=1, put_weights=object_store.put)
    with torch.no_grad():
        for p in learner.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    learner.publisher.bump()
    assert w.load_weights(learner.publish_weights()) is True
    assert w.policy_version == 1
    assert torch.equal(w.flat.buffers["torch.float32"], learner.flat.buffers["torch.float32"])
    (after,) = w.generate(prompts("12="))
    assert after.samples[0].policy_version == 1
    assert after.samples[0].logprobs != before.samples[0].logprobs
    assert w.load_weights(learner.publish_weights()) is False  # same version again: no-op


def test_flat_params_keep_tied_weights_and_reject_other_layouts(tiny_policy):
    from transformers import AutoModelForCausalLM

    from actors.models.tiny import build_tiny_llama
    from actors.weights.payload import Payload

    model = AutoModelForCausalLM.from_pretrained(tiny_policy)
    flat = FlatParams(model)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert flat.numel == sum(p.numel() for p in model.parameters())
    other = FlatParams(build_tiny_llama(20, hidden_size=16, num_layers=1, num_heads=2))
    r = WeightReceiver(other)
    import pytest

    with pytest.raises(ValueError, match="layout"):
        r.apply(Payload(version=1, fingerprint=flat.fingerprint, refs={}), fetch=lambda refs: refs)
    assert r.version == 0


def test_skipping_zero_advantage_samples_leaves_the_gradient_unchanged(tiny_policy):
    """The learner skips samples whose advantage is 0; the gradient must be identical."""
    from learner.core_algos import group_advantages

    w = RolloutWorker(tiny_policy, RolloutConfig(group_size=4, max_new_tokens=5), seed=7)
    groups = w.generate(prompts("12=", "345=", "6789=", "1="))
    rewards = [[1.0, 0.0, 0.0, 1.0], [0.5] * 4, [0.0, 0.0, 0.0, 2.0], [1.0] * 4]  # two all-equal groups
    for g, rs in zip(groups, rewards):
        for s, r in zip(g.samples, rs):
            s.reward = r
    learner = Learner(tiny_policy, LearnerConfig(num_threads=1, micro_batch_size=3), total_steps=1)
    batch = TrainBatch.from_groups(groups)
    adv = group_advantages(batch.rewards, batch.group_index)
    grads = {}
    for skip in (True, False):
        learner.optimizer.zero_grad(set_to_none=True)
        loss, active, _ = learner.accumulate_gradients(batch, adv, skip_zero_advantage=skip)
        grads[skip] = torch.cat([p.grad.reshape(-1) for p in learner.model.parameters()])
        assert active == (8 if skip else 16)
    assert grads[True].abs().sum() > 0
    assert torch.allclose(grads[True], grads[False], atol=1e-7, rtol=1e-5)


def test_an_engine_that_failed_marks_the_worker_broken(tiny_policy):
    """After its engine raised, a worker may hold half-loaded weights or unfinished requests:
    it refuses generate, evaluate and load_weights (its loop fails and the fleet replaces it)."""
    from actors.weights.payload import Payload

    w = RolloutWorker(tiny_policy, RolloutConfig(group_size=2, max_new_tokens=3))
    w.engine.model = None  # the engine lost its model, as after a crash inside it
    with pytest.raises(AttributeError):
        w.generate(prompts("12="))
    with pytest.raises(RuntimeError, match=r"engine failed earlier \(generating: AttributeError.*must be replaced"):
        w.generate(prompts("12="))
    with pytest.raises(RuntimeError, match="must be replaced"):
        w.load_weights(Payload(1, w.flat.fingerprint, {}))
    assert w.policy_version == 0


@pytest.mark.parametrize("rollout_dtype", ["float32", "bfloat16"])
def test_the_object_store_is_sized_from_the_real_payload(tiny_policy, rollout_dtype, monkeypatch):
    """The driver reads a payload's size from the policy's safetensors headers before any actor
    starts; it must equal what the learner publishes (tied weights once, the workers' dtype)."""
    from learner.cli import object_store_bytes
    from learner.config import load_config
    from learner.driver.policy import payload_bytes

    monkeypatch.delenv("FLEETRL_OBJECT_STORE_BYTES", raising=False)
    cfg = load_config(None, ["--model.path", tiny_policy, "--rollout.dtype", rollout_dtype, "--train.max_staleness", "2"])
    learner = Learner(tiny_policy, LearnerConfig(num_threads=1), total_steps=1, put_weights=lambda a: a,
                      publish_dtype=rollout_dtype)
    published = sum(a.nbytes for a in learner.publish_weights().refs.values())
    assert payload_bytes(cfg) == published > 0
    assert object_store_bytes(cfg) == 1_000_000_000 + 5 * published
