"""Reward workers: verifier, user callables, and failures that are flagged, never zeroed;
the trainer's reward-server client (retries, circuit breaker) against real gRPC servers."""

import contextlib
import math
import threading

import grpc
import pytest

from actors.reward.client import CircuitBreaker, RemoteRewardClient
from actors.reward.functions import load_reward_fn
from actors.reward.models import RewardModelSpec
from actors.reward.scores import ScoreBatch
from actors.reward.server import SERVICE_NAME
from actors.reward.worker import RewardConfig, RewardWorker
from actors.serving import ServerConfig, serve
from actors.types import Excluded, Exclusion, Group, Prompt, Sample
from protos import reward_pb2, reward_pb2_grpc


def make_groups(completions_per_prompt: list[list[str]], answers: list[str]) -> list[Group]:
    groups = []
    for i, (comps, ans) in enumerate(zip(completions_per_prompt, answers)):
        samples = [Sample(completion_ids=[10 + j], completion_text=c, logprobs=[-0.1], policy_version=0)
                   for j, c in enumerate(comps)]
        groups.append(Group(prompt=Prompt(uid=i, text=f"{ans[::-1]}=", metadata={"answer": ans}), prompt_ids=[3, i],
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


def inf_reward(prompts, completions, **metadata):
    return [{"+": math.inf, "-": -math.inf}.get(c, 1.0) for c in completions]


def text_reward(prompts, completions, **metadata):
    return [{"word": "high", "none": None}.get(c, 1) for c in completions]


def scalar_reward(prompts, completions, **metadata):
    return 1.0


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
    ("scalar_reward", "reward_invalid"),
])
def test_failing_function_excludes_every_sample(fn, reason):
    w = RewardWorker.from_config(RewardConfig(functions=[f"tests.test_reward:{fn}"]))
    groups = w.score(make_groups([["a", "b"], ["c"]], ["x", "y"]))
    for s in (s for g in groups for s in g.samples):
        assert s.reward is None, "a failed reward must never become a number"
        assert s.excluded.kind.value == reason
        assert not s.trainable
    assert w.errors == 3


def test_nan_excludes_only_the_nan_sample():
    w = RewardWorker.from_config(RewardConfig(functions=["tests.test_reward:nan_reward"]))
    (g,) = w.score(make_groups([["ok", "bad", "ok"]], ["x"]))
    assert [s.trainable for s in g.samples] == [True, False, True]
    assert g.samples[1].excluded.kind is Exclusion.REWARD_NONFINITE and g.samples[1].reward is None
    assert g.samples[0].reward == 1.0


@pytest.mark.parametrize("fn, bad, kind", [
    ("inf_reward", ["+", "-"], Exclusion.REWARD_NONFINITE),
    ("text_reward", ["word", "none"], Exclusion.REWARD_INVALID),
])
def test_infinite_and_non_numeric_scores_exclude_only_those_samples(fn, bad, kind):
    w = RewardWorker.from_config(RewardConfig(functions=[f"tests.test_reward:{fn}"]))
    (g,) = w.score(make_groups([["ok", *bad, "fine"]], ["x"]))
    ok, *flagged, fine = g.samples
    assert [s.excluded.kind for s in flagged] == [kind, kind] and all(s.reward is None for s in flagged)
    assert ok.reward == fine.reward == 1.0 and ok.trainable and fine.trainable
    assert w.errors == 2


def test_one_failing_function_excludes_even_if_another_succeeds():
    cfg = RewardConfig(functions=["exact_match", "tests.test_reward:raising_reward"])
    (g,) = RewardWorker.from_config(cfg).score(make_groups([["4321"]], ["4321"]))
    assert g.samples[0].excluded.kind is Exclusion.REWARD_ERROR and g.samples[0].reward is None


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
    """A run-time model whose ``submit(batch)`` returns ``results(prompts, completions, metadata)``."""
    return lambda batch: (lambda: results(batch.prompts, batch.completions, batch.metadata))


def test_run_time_models_join_the_weighted_sum_and_flag_failures():
    w = RewardWorker.from_config(RewardConfig())
    seen = {}

    def rm(prompts, completions, metadata):
        seen.update(metadata)
        return [0.5, Excluded(Exclusion.REWARD_TIMEOUT, "'rm' DEADLINE_EXCEEDED"), 2.0]

    w.set_models([("rm", 2.0, _ready(rm))])
    (g,) = w.score(make_groups([["4321", "4321", "1"]], ["4321"]))
    a, b, c = g.samples
    assert seen == {"answer": ["4321"] * 3}
    assert a.reward == pytest.approx(1.0 + 2.0 * 0.5) and a.rewards == {"exact_match": 1.0, "rm": 0.5}
    assert b.reward is None and b.excluded == Excluded(Exclusion.REWARD_TIMEOUT, "'rm' DEADLINE_EXCEEDED")
    assert c.reward == pytest.approx(0.0 + 2.0 * 2.0)
    w.set_models([])  # removal takes effect at the next batch
    (g,) = w.score(make_groups([["4321"]], ["4321"]))
    assert g.samples[0].rewards == {"exact_match": 1.0}


@pytest.mark.parametrize("results, kind", [
    (lambda p, c, m: [float("nan")] * len(p), Exclusion.REWARD_INVALID),  # models return validated scores
    (lambda p, c, m: ["reward_timeout: a string"] * len(p), Exclusion.REWARD_INVALID),
    (lambda p, c, m: [1.0], Exclusion.REWARD_COUNT),
    (lambda p, c, m: 1 / 0, Exclusion.REWARD_ERROR),
])
def test_a_model_that_breaks_the_result_contract_flags_the_call(results, kind):
    w = RewardWorker.from_config(RewardConfig())
    w.set_models([("rm", 1.0, _ready(results))])
    (g,) = w.score(make_groups([["4321", "1"]], ["4321"]))
    assert all(s.reward is None and s.excluded.kind is kind for s in g.samples)


def test_models_get_the_token_ids_of_every_sample():
    w = RewardWorker.from_config(RewardConfig())
    seen = []

    def submit(batch):
        seen.append(batch)
        return lambda: [0.0] * len(batch)

    w.set_models([("rm", 1.0, submit)])
    w.score(make_groups([["4321", "1"], ["7"]], ["4321", "7"]))
    (batch,) = seen
    assert batch.prompt_ids == [[3, 0], [3, 0], [3, 1]] and batch.completion_ids == [[10], [11], [10]]
    assert batch.slice(slice(1, 3)).completion_ids == [[11], [10]]


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_circuit_breaker_opens_fails_fast_trials_once_and_closes():
    clock = Clock()
    b = CircuitBreaker(threshold=3, cooldown_s=2.0, clock=clock)
    for _ in range(2):
        assert b.allow()
        b.record(False)
    assert b.healthy, "below the threshold the circuit stays closed"
    b.record(True)  # a success resets the count of consecutive failures
    for _ in range(3):
        assert b.allow()
        b.record(False)
    assert not b.healthy and not b.allow(), "open: fail fast"
    clock.now += 1.9
    assert not b.allow(), "still cooling down"
    clock.now += 0.1
    assert b.allow() and not b.allow(), "after the cooldown exactly one trial call"
    b.record(False)  # the trial failed: open again, a new cooldown from now
    assert not b.healthy and not b.allow()
    clock.now += 2.0
    assert b.allow()
    b.record(True)
    assert b.healthy and b.allow() and b.allow(), "a successful trial closes the circuit"


def test_duplicate_model_name_is_refused():
    w = RewardWorker.from_config(RewardConfig())
    with pytest.raises(ValueError, match="duplicate"):
        w.set_models([("exact_match", 1.0, _ready(lambda p, c, m: [0.0] * len(p)))])


# ---- the trainer's client (RemoteRewardClient) against real servers ---------------------------

class FlakyRewardModel(reward_pb2_grpc.RewardModelServicer):
    """Fails the first ``failures`` Score calls with ``code``, then scores 0.5; records every call."""

    def __init__(self, failures: int, code=grpc.StatusCode.UNAVAILABLE):
        self.failures, self.code = failures, code
        self.calls: list[tuple[float, reward_pb2.ScoreRequest]] = []
        self.lock = threading.Lock()

    def Score(self, request, context):
        import time

        with self.lock:
            self.calls.append((time.monotonic(), request))
            n = len(self.calls)
        if n <= self.failures:
            context.abort(self.code, f"failing call {n}")
        return reward_pb2.ScoreResponse(scores=[0.5] * len(request.samples))


@contextlib.contextmanager
def client_of(servicer, clock=None, **spec):
    running = serve(ServerConfig(), lambda s: reward_pb2_grpc.add_RewardModelServicer_to_server(servicer, s),
                    [SERVICE_NAME])
    client = RemoteRewardClient(RewardModelSpec(name="rm", endpoint=running.address, **spec),
                                **({"clock": clock} if clock else {}))
    try:
        yield client
    finally:
        client.close()
        running.stop(grace_s=0, lame_duck_s=0)


BATCH = ScoreBatch(prompts=["1=", "2="], completions=["1", "2"], metadata={"answer": ["1", None]},
                   prompt_ids=[[5, 6], [7, 6]], completion_ids=[[5, 2], [8]])


def test_client_retries_unavailable_with_backoff_then_scores():
    servicer = FlakyRewardModel(failures=2)
    with client_of(servicer, max_attempts=3) as client:
        assert client.score(BATCH) == [0.5, 0.5]
    assert len(servicer.calls) == 3
    (t0, first), (t1, _), (t2, _) = servicer.calls
    assert t1 - t0 >= 0.1 and t2 - t1 >= 0.2, "exponential back-off between the tries"
    assert len({r.request_id for _, r in servicer.calls}) == 1 and len(first.request_id) == 32, \
        "retries of one call share its request_id"
    s0, s1 = first.samples
    assert (list(s0.prompt_token_ids), list(s0.completion_token_ids), list(s1.completion_token_ids)) \
        == ([5, 6], [5, 2], [8])
    assert (dict(s0.metadata), dict(s1.metadata)) == ({"answer": "1"}, {"answer": ""})
    assert client.info()["healthy"] and client.info()["scored"] == 2


def test_client_stops_at_max_attempts():
    servicer = FlakyRewardModel(failures=5)
    with client_of(servicer, max_attempts=3) as client:
        result = client.score(BATCH)
        request_id = servicer.calls[0][1].request_id
        client.score(BATCH)  # the next call is a new request
    assert len(servicer.calls) == 6 and servicer.calls[3][1].request_id != request_id
    assert [r.kind for r in result] == [Exclusion.REWARD_UNAVAILABLE] * 2
    assert "after 3 attempt(s)" in result[0].detail and request_id in result[0].detail


def test_client_does_not_retry_other_errors():
    servicer = FlakyRewardModel(failures=1, code=grpc.StatusCode.INTERNAL)
    with client_of(servicer, max_attempts=3) as client:
        result = client.score(BATCH)
    assert len(servicer.calls) == 1 and [r.kind for r in result] == [Exclusion.REWARD_ERROR] * 2


def test_client_circuit_fails_fast_while_open_then_lets_one_trial_through():
    servicer = FlakyRewardModel(failures=2)
    now = [0.0]
    with client_of(servicer, clock=lambda: now[0], max_attempts=1, failure_threshold=2, cooldown_s=5.0) as client:
        assert [client.score(BATCH)[0].kind for _ in range(2)] == [Exclusion.REWARD_UNAVAILABLE] * 2
        fast = client.score(BATCH)
        assert len(servicer.calls) == 2, "an open circuit does not call the server"
        assert fast[0].kind is Exclusion.REWARD_UNHEALTHY and not client.info()["healthy"]
        now[0] = 5.0
        assert client.score(BATCH) == [0.5, 0.5] and len(servicer.calls) == 3
        assert client.info()["healthy"]
