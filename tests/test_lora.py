"""LoRA (``model.lora``): the learner trains PEFT adapters, payloads carry only them, and rollout
workers merge them into their own base. Real PEFT, real models, payloads through plain
in-process put/fetch functions (the transports are tested elsewhere; here Ray only where a
whole run or a vLLM actor needs it)."""

from __future__ import annotations

import copy
import io
import json

import pytest
import ray
import torch

from actors.rollout.policy import load_policy
from actors.rollout.worker import RolloutConfig, RolloutWorker
from actors.types import Prompt
from actors.weights.lora import LoraSpec
from learner.batch import TrainBatch
from learner.checkpoint import CheckpointError
from learner.learner import Learner, LearnerConfig
from tests.test_pipeline import assert_workers_end_on_the_learners_weights, read_metrics, small_config

SPEC = LoraSpec(rank=4, alpha=8.0)


def put(array):  # an in-process "object store": the handle is the array itself
    return array


def fetch(refs):
    return refs


def prompts(*texts):
    return [Prompt(uid=i, text=t) for i, t in enumerate(texts)]


def learner(policy: str, **kw) -> Learner:
    cfg = LearnerConfig(num_threads=1, lr=5e-2, micro_batch_size=8, **kw)
    return Learner(policy, cfg, total_steps=10, put_weights=put, lora=SPEC)


def worker(policy: str, **kw) -> RolloutWorker:
    cfg = RolloutConfig(group_size=4, max_new_tokens=6, **kw)
    return RolloutWorker(policy, cfg, seed=1, fetch_weights=fetch, lora=SPEC)


def step(lrn: Learner, w: RolloutWorker, texts=("12=", "4321=", "987=")) -> dict:
    """One update on groups ``w`` sampled; rewards differ within each group (so every group counts)."""
    groups = w.generate(prompts(*texts))
    for g in groups:
        for i, s in enumerate(g.samples):
            s.reward = float(i % 2)
    return lrn.train_step(groups)


def merged_reference(lrn: Learner):
    """PEFT's own merge of the learner's adapters into its base (a copy)."""
    return copy.deepcopy(lrn.model).merge_and_unload()


def test_only_adapters_train_and_workers_merge_them_exactly_version_after_version(tiny_policy):
    lrn, w = learner(tiny_policy), worker(tiny_policy)
    base = {n: p.detach().clone() for n, p in lrn.model.named_parameters() if "lora_" not in n}
    adapters = [p for n, p in lrn.model.named_parameters() if "lora_" in n]
    assert adapters and all(p.requires_grad for p in adapters)
    assert sum(len(g["params"]) for g in lrn.optimizer.param_groups) == len(adapters)  # AdamW holds the adapters only
    payload_numel = sum(b.numel() for b in lrn.flat.buffers.values())
    assert payload_numel == sum(p.numel() for p in adapters)
    print(f"adapter payload / full weights: {payload_numel} / {sum(b.numel() for b in w.flat.buffers.values())}")
    for version in (1, 2):  # the second merge must start from the base, not from version 1's merge
        m = step(lrn, w)
        assert m["active_samples"] > 0 and len(lrn.optimizer.state) == len(adapters)
        assert w.load_weights(lrn.publish_weights()) and w.policy_version == version
        reference = dict(merged_reference(lrn).named_parameters())
        for name, p in w.model.named_parameters():
            assert torch.allclose(p, reference[name], atol=1e-6), name
    assert all(torch.equal(p, base[n]) for n, p in lrn.model.named_parameters() if "lora_" not in n)
    changed = [n for n, p in lrn.model.named_parameters() if "lora_B" in n and p.abs().sum() > 0]
    assert changed, "no adapter moved"
    # on-policy samples of the merged worker are what the learner's adapted forward recomputes
    groups = w.generate(prompts("55=", "1234="))
    for s in (s for g in groups for s in g.samples):
        s.reward = 0.0  # scored: only scored samples are trainable
    behaviour = [s.logprobs for g in groups for s in g.samples]
    assert lrn.proximal_logprobs(TrainBatch.from_groups(groups)) == [pytest.approx(b, abs=1e-4) for b in behaviour]


def test_a_worker_on_another_base_refuses_the_adapters(tiny_policy, tmp_path):
    model, tok = load_policy(tiny_policy, device=torch.device("cpu"), dtype="float32")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.01)  # a fine-tuned variant: same shapes
    model.save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    lrn, w = learner(tiny_policy), worker(str(tmp_path / "other"))
    step(lrn, worker(tiny_policy))
    with pytest.raises(ValueError, match="different base weights"):
        w.load_weights(lrn.publish_weights())
    assert w.policy_version == 0


def test_the_kl_reference_is_the_base_with_the_adapters_off(tiny_policy):
    lrn, w = learner(tiny_policy, kl_coef=0.5), worker(tiny_policy)
    assert lrn.ref_model is None  # no second copy of the policy
    first = step(lrn, w)
    assert first["kl"] == pytest.approx(0.0, abs=1e-7)  # lora_B starts at zero: adapted == base
    w.load_weights(lrn.publish_weights())
    later = [step(lrn, w)["kl"] for _ in range(2)]
    assert later[-1] > 1e-5, later  # the adapters moved the policy away from the base


def test_checkpoints_hold_the_adapter_in_peft_format_and_resume_it(tiny_policy, tmp_path):
    lrn, w = learner(tiny_policy), worker(tiny_policy)
    lrn.save_state(str(tmp_path / "before"))  # before any update: saving must not create AdamW state
    assert not lrn.optimizer.state  # (torch's state-dict helper takes a zero-lr step to create it)
    step(lrn, w)
    lrn.save_state(str(tmp_path / "ckpt"))
    files = {p.name for p in (tmp_path / "ckpt" / "policy").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    resumed = learner(tiny_policy)
    assert resumed.load_state(str(tmp_path / "ckpt")) == 1
    assert torch.equal(resumed.param_vector(), lrn.param_vector())
    assert resumed.weights_digest() == lrn.weights_digest()
    full = Learner(tiny_policy, LearnerConfig(num_threads=1), total_steps=1)
    with pytest.raises(CheckpointError, match="holds LoRA adapters but model.lora.rank is 0"):
        full.load_state(str(tmp_path / "ckpt"))
    rescaled = Learner(tiny_policy, LearnerConfig(num_threads=1), total_steps=1, lora=LoraSpec(rank=4, alpha=16.0))
    with pytest.raises(CheckpointError, match=r"rank, alpha \(4, 8.0\), model.lora asks for \(4, 16.0\)"):
        rescaled.load_state(str(tmp_path / "ckpt"))  # same shapes, another scale: refused, not rescaled
    # the saved adapter folder is a policy: its base with the adapter merged; as a run's model.path
    # it becomes a plain folder once (vLLM and the next LoRA run's base need one)
    merged, _ = load_policy(str(tmp_path / "ckpt" / "policy"), device=torch.device("cpu"), dtype="float32")
    reference = dict(merged_reference(lrn).named_parameters())
    assert all(torch.allclose(p, reference[n], atol=1e-6) for n, p in merged.named_parameters())
    from learner.driver.policy import merge_adapter_folder

    plain = merge_adapter_folder(str(tmp_path / "ckpt" / "policy"), tmp_path / "run2", allow_pickle=False)
    assert (tmp_path / "run2" / "policy-from-adapter" / "config.json").is_file()
    again, _ = load_policy(plain, device=torch.device("cpu"), dtype="float32")
    assert all(torch.allclose(p, reference[n], atol=1e-6) for n, p in again.named_parameters())


def test_a_lora_run_keeps_exact_accounting_and_saves_adapter_and_merged_policy(ray_session, tiny_policy, tmp_path):
    from learner.driver.trainer import Trainer

    cfg = small_config(tiny_policy, "--model.lora.rank", "4", "--model.lora.save_merged", "true",
                       "--learner.lr", "5e-2", "--train.steps", "4")
    t = Trainer(cfg, tmp_path / "run", out=io.StringIO(), progress=False)
    try:
        s = t.train()
        assert s["produced"] == s["trained"] + s["dropped"] and s["steps"] == 4
        assert_workers_end_on_the_learners_weights(t, 4)  # the workers hold the learner's adapters
    finally:
        t.shutdown()
    assert any(r["active_samples"] for r in read_metrics(tmp_path))
    run = tmp_path / "run"
    assert json.loads((run / "policy" / "adapter_config.json").read_text())["r"] == 4
    adapter, _ = load_policy(str(run / "policy"), device=torch.device("cpu"), dtype="float32")
    merged, _ = load_policy(str(run / "policy-merged"), device=torch.device("cpu"), dtype="float32")
    base, _ = load_policy(tiny_policy, device=torch.device("cpu"), dtype="float32")
    pairs = list(zip(adapter.parameters(), merged.parameters(), base.parameters()))
    assert all(torch.allclose(a, m, atol=1e-6) for a, m, _ in pairs)
    assert any(not torch.equal(m, b) for _, m, b in pairs), "the merged policy is the base"


def test_vllm_workers_reload_merged_weights(ray_session, warm_policy):
    """The vLLM engine takes adapters as merged weights (a full reload); its greedy output is the
    HF engine's with the same adapters."""
    from actors.rollout.engines.vllm import VLLMConfig, vllm_unavailable
    from actors.runtime import object_store
    from actors.runtime.rollout_actor import create_rollout_actor

    if vllm_unavailable():
        pytest.skip(vllm_unavailable())
    lrn = Learner(warm_policy, LearnerConfig(num_threads=1, lr=5e-2), total_steps=10,
                  put_weights=object_store.put, lora=SPEC)
    hf = RolloutWorker(warm_policy, RolloutConfig(group_size=2, max_new_tokens=8, temperature=0.0), seed=1,
                       fetch_weights=object_store.fetch, lora=SPEC)
    cfg = RolloutConfig(engine="vllm", group_size=2, max_new_tokens=8, temperature=0.0, num_threads=1,
                        vllm=VLLMConfig(engine_args={"block_size": 32}))
    actor = create_rollout_actor(warm_policy, cfg, name="vllm-lora", seed=1, default_max_new_tokens=8, lora=SPEC)
    try:
        texts = ("12345=", "908=", "7777=")
        before = [[s.completion_ids for s in g.samples] for g in ray.get(actor.generate.remote(prompts(*texts)))]
        for _ in range(3):
            step(lrn, hf, texts)
            payload = lrn.publish_weights()
            assert hf.load_weights(payload) and ray.get(actor.load_weights.remote(payload))
        out = {name: [[s.completion_ids for s in g.samples] for g in groups] for name, groups in
               (("vllm", ray.get(actor.generate.remote(prompts(*texts)))), ("hf", hf.generate(prompts(*texts))))}
        assert out["vllm"] == out["hf"]
        assert out["vllm"] != before, "the adapters changed no greedy completion"
        assert ray.get(actor.policy_version.remote()) == 3
    finally:
        ray.kill(actor)
