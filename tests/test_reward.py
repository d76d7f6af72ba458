"""Reward workers: verifier, user callables, and failures that are flagged, never zeroed."""

import math

import pytest

from actors.reward.functions import load_reward_fn
from actors.reward.worker import RewardConfig, RewardWorker
from actors.types import Group, Prompt, Sample


def make_groups(completions_per_prompt: list[list[str]], answers: list[str]) -> list[Group]:
    groups = []
    for i, (comps, ans) in enumerate(zip(completions_per_prompt, answers)):
        samples = [Sample(completion_ids=[1], completion_text=c, logprobs=[-0.1], policy_version=0) for c in comps]
        groups.append(Group(prompt=Prompt(uid=i, text=f"{ans[::-1]}=", metadata={"answer": ans}), prompt_ids=[3],
                            samples=samples))
    return groups


# user reward functions, loaded by "module:function" from this test module
def length_reward(prompts, completions, **metadata):
    return [float(len(c)) for c in completions]


def raising_reward(prompts, completions, **metadata):
    raise RuntimeError("reward backend is down")


def nan_reward(prompts, completions, **metadata):
    return [math.nan if c == "bad" else 1.0 for c in completions]


def short_reward(prompts, completions, **metadata):
    return [1.0] * (len(completions) - 1)


def test_exact_match_verifier():
    w = RewardWorker.from_config(RewardConfig())
    groups = w.score(make_groups([["4321", " 4321 ", "1234", ""]], ["4321"]))
    assert [s.reward for s in groups[0].samples] == [1.0, 1.0, 0.0, 0.0]
    assert all(s.excluded is None for s in groups[0].samples)


def test_weighted_combination_of_functions():
    cfg = RewardConfig(functions=["exact_match", "tests.test_reward:length_reward"], weights=[2.0, 0.5])
    groups = RewardWorker.from_config(cfg).score(make_groups([["4321", "12"]], ["4321"]))
    a, b = groups[0].samples
    assert a.rewards == {"exact_match": 1.0, "tests.test_reward:length_reward": 4.0}
    assert a.reward == pytest.approx(2.0 * 1.0 + 0.5 * 4.0)
    assert b.reward == pytest.approx(0.0 + 0.5 * 2.0)


@pytest.mark.parametrize("fn, reason", [
    ("raising_reward", "reward_error"),
    ("short_reward", "reward_count"),
])
def test_failing_function_excludes_every_sample(fn, reason):
    w = RewardWorker.from_config(RewardConfig(functions=[f"tests.test_reward:{fn}"]))
    groups = w.score(make_groups([["a", "b"], ["c"]], ["x", "y"]))
    for s in (s for g in groups for s in g.samples):
        assert s.reward is None, "a failed reward must never become a number"
        assert s.excluded.startswith(reason)
        assert not s.trainable
    assert w.errors == 3


def test_nan_excludes_only_the_nan_sample():
    w = RewardWorker.from_config(RewardConfig(functions=["tests.test_reward:nan_reward"]))
    (g,) = w.score(make_groups([["ok", "bad", "ok"]], ["x"]))
    assert [s.trainable for s in g.samples] == [True, False, True]
    assert g.samples[1].excluded.startswith("reward_nonfinite") and g.samples[1].reward is None
    assert g.samples[0].reward == 1.0


def test_one_failing_function_excludes_even_if_another_succeeds():
    cfg = RewardConfig(functions=["exact_match", "tests.test_reward:raising_reward"])
    (g,) = RewardWorker.from_config(cfg).score(make_groups([["4321"]], ["4321"]))
    assert g.samples[0].excluded.startswith("reward_error") and g.samples[0].reward is None


@pytest.mark.parametrize("spec, msg", [
    ("nomodule_xyz:fn", "cannot load"),
    ("tests.test_reward:missing", "cannot load"),
    ("no_colon", "neither a built-in"),
    ("tests.test_reward:math", "not callable"),
])
def test_bad_function_specs(spec, msg):
    with pytest.raises(ValueError, match=msg):
        load_reward_fn(spec)


def _ready(results):
    return lambda prompts, completions, metadata: (lambda: results(prompts, completions, metadata))


def test_run_time_models_join_the_weighted_sum_and_flag_failures():
    w = RewardWorker.from_config(RewardConfig())
    seen = {}

    def rm(prompts, completions, metadata):
        seen.update(metadata)
        return [0.5, "reward_timeout: 'rm' DEADLINE_EXCEEDED", 2.0]

    w.set_models([("rm", 2.0, _ready(rm))])
    (g,) = w.score(make_groups([["4321", "4321", "1"]], ["4321"]))
    a, b, c = g.samples
    assert seen == {"answer": ["4321"] * 3}
    assert a.reward == pytest.approx(1.0 + 2.0 * 0.5) and a.rewards == {"exact_match": 1.0, "rm": 0.5}
    assert b.reward is None and b.excluded.startswith("reward_timeout")
    assert c.reward == pytest.approx(0.0 + 2.0 * 2.0)
    w.set_models([])  # removal takes effect at the next batch
    (g,) = w.score(make_groups([["4321"]], ["4321"]))
    assert g.samples[0].rewards == {"exact_match": 1.0}


@pytest.mark.parametrize("results, reason", [
    (lambda p, c, m: [float("nan")] * len(p), "reward_nonfinite"),
    (lambda p, c, m: [1.0], "reward_count"),
    (lambda p, c, m: 1 / 0, "reward_error"),
])
def test_bad_model_results_are_flagged(results, reason):
    w = RewardWorker.from_config(RewardConfig())
    w.set_models([("rm", 1.0, _ready(results))])
    (g,) = w.score(make_groups([["4321", "1"]], ["4321"]))
    assert all(s.reward is None and s.excluded.startswith(reason) for s in g.samples)


def test_duplicate_model_name_is_refused():
    w = RewardWorker.from_config(RewardConfig())
    with pytest.raises(ValueError, match="duplicate"):
        w.set_models([("exact_match", 1.0, _ready(lambda p, c, m: [0.0] * len(p)))])
