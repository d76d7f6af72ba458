"""The coordinator's staleness gate, buffer and accounting (plain asyncio, no Ray)."""

import asyncio
import itertools

import pytest

from actors.runtime.coordinator import Coordinator, SampleTimeout
from actors.types import Excluded, Exclusion, Group, Prompt, Sample
from actors.weights.payload import Payload


def stream():
    for i in itertools.count():
        yield Prompt(uid=i, text=f"{i}=", metadata={})


def group(prompt: Prompt, version: int, n: int = 2, reward=1.0, excluded=None, worker="w") -> Group:
    samples = [Sample(completion_ids=[1], completion_text="x", logprobs=[-1.0], policy_version=version,
                      reward=reward, excluded=excluded) for _ in range(n)]
    return Group(prompt=prompt, prompt_ids=[1], samples=samples, worker=worker)


async def acquire_now(c: Coordinator):
    return await c.acquire("w", timeout_s=0.05)


def run(coro):
    return asyncio.run(coro)


def test_on_policy_gate_blocks_until_new_weights():
    async def body():
        c = Coordinator(stream(), groups_per_step=2, prompts_per_request=1, max_staleness=0)
        h = await acquire_now(c)
        a, v = h.prompts, h.policy_version
        b = (await acquire_now(c)).prompts
        assert [p.uid for p in a + b] == [0, 1] and v == 0
        blocked = (await acquire_now(c)).prompts
        assert blocked == [], "third prompt must wait for version 1 when max_staleness=0"
        await c.put([group(a[0], 0), group(b[0], 0)])
        batch = await c.get_batch(0, timeout_s=1)
        assert len(batch) == 2
        still_blocked = (await acquire_now(c)).prompts
        assert still_blocked == []
        with pytest.raises(ValueError, match="only 2 handed out"):
            await c.publish(Payload(version=1, fingerprint="f"), commit_groups=3)
        await c.publish(Payload(version=1, fingerprint="f"), commit_groups=2)
        h = await acquire_now(c)
        nxt, v = h.prompts, h.policy_version
        assert [p.uid for p in nxt] == [2] and v == 1
    run(body())


def test_newer_weights_come_with_the_prompts_only_when_newer_than_the_callers():
    async def body():
        c = Coordinator(stream(), groups_per_step=1, prompts_per_request=1, max_staleness=3)
        assert (await c.acquire("w", 0.05, have_version=0)).weights is None  # nothing published yet
        await c.publish(Payload(version=0, fingerprint="f"))
        assert (await c.acquire("w", 0.05, have_version=0)).weights is None  # the caller has it
        await c.publish(Payload(version=1, fingerprint="g"))
        h = await c.acquire("w", 0.05, have_version=0)
        assert h.prompts and h.policy_version == 1 and h.weights.fingerprint == "g"
        assert (await c.acquire("w", 0.05, have_version=1)).weights is None
        assert (await c.acquire("w", 0.05)).weights is None  # no have_version: the caller fetches them itself
        for _ in range(4):  # the gate closed: the weights still come (a worker loads them while it waits)
            h = await c.acquire("w", 0.05, have_version=0)
        assert h.prompts == [] and h.weights.version == 1
    run(body())


def test_async_gate_runs_k_versions_ahead():
    async def body():
        c = Coordinator(stream(), groups_per_step=2, prompts_per_request=2, max_staleness=2)
        got = []
        for _ in range(4):
            ps = (await acquire_now(c)).prompts
            got += ps
        assert len(got) == 6  # (0 + 2 + 1) * 2 groups may be live at version 0
        assert c.capacity_bound() == 6
    run(body())


def test_stale_groups_are_dropped_and_counted():
    async def body():
        c = Coordinator(stream(), groups_per_step=1, prompts_per_request=1, max_staleness=1)
        ps = []
        for v in range(1, 4):
            await c.publish(Payload(version=v, fingerprint="f"))
        for _ in range(2):
            p = (await acquire_now(c)).prompts
            ps += p
        await c.put([group(ps[0], version=1, n=3), group(ps[1], version=2, n=3)])
        batch = await c.get_batch(3, timeout_s=1)  # learner at v3: v1 is 2 behind -> dropped
        assert [g.policy_version for g in batch] == [2]
        assert c.stats()["trained"] == 0, "trained only once the learner step is committed"
        s = await c.publish(Payload(version=4, fingerprint="f"), commit_groups=1)
        assert s["dropped_by_reason"] == {"stale": 3} and s["trained"] == 3 and s["produced"] == 6
        assert s["produced"] == s["trained"] + s["dropped"]
    run(body())


def test_excluded_samples_are_counted_and_free_the_gate():
    async def body():
        c = Coordinator(stream(), groups_per_step=1, prompts_per_request=1, max_staleness=0)
        (p0,) = (await acquire_now(c)).prompts
        assert (await acquire_now(c))[0] == []
        bad = group(p0, 0, n=2, reward=None, excluded=Excluded(Exclusion.REWARD_ERROR, "boom"))
        await c.put([bad])  # nothing trainable: the slot must reopen, or the run would hang
        (p1,) = (await acquire_now(c)).prompts
        partly = group(p1, 0, n=2)
        partly.samples[0].excluded = Excluded(Exclusion.REWARD_NONFINITE, "nan")
        partly.samples[0].reward = None
        await c.put([partly])
        batch = await c.get_batch(0, timeout_s=1)
        assert len(batch[0].trainable_samples()) == 1
        s = await c.publish(Payload(version=1, fingerprint="f"), commit_groups=1)
        assert s["dropped_by_reason"] == {"reward_error": 2, "reward_nonfinite": 1}
        assert (s["produced"], s["trained"], s["dropped"]) == (4, 1, 3)
        assert s["last_error"]["reward_error"] == "reward_error: boom"
    run(body())


def test_timeout_loses_nothing_and_drain_accounts_for_leftovers():
    async def body():
        c = Coordinator(stream(), groups_per_step=3, prompts_per_request=3, max_staleness=0)
        ps = (await acquire_now(c)).prompts
        await c.put([group(ps[0], 0)])
        with pytest.raises(SampleTimeout, match="1/3"):
            await c.get_batch(0, timeout_s=0.1)
        assert len(c.buffer) == 1, "a timed-out batch must go back to the buffer"
        await c.stop()
        assert (await c.acquire("w", timeout_s=1))[0] is None
        s = await c.drain()
        assert s["dropped_by_reason"] == {"end_of_run": 2} and s["produced"] == s["trained"] + s["dropped"]
    run(body())


def test_uncommitted_batches_and_late_groups_are_dropped_not_lost():
    async def body():
        c = Coordinator(stream(), groups_per_step=1, prompts_per_request=2, max_staleness=1)
        ps = (await acquire_now(c)).prompts
        await c.put([group(ps[0], 0, n=3)])
        await c.get_batch(0, timeout_s=1)  # handed to a learner that then fails: never committed
        await c.stop()
        await c.put([group(ps[1], 0, n=2)])  # a worker's last group lands after stop
        assert len(c.buffer) == 0
        s = await c.drain()
        assert s["dropped_by_reason"] == {"not_trained": 3, "end_of_run": 2}
        assert (s["produced"], s["trained"]) == (5, 0)
    run(body())


def test_cancelled_get_batch_puts_groups_back():
    async def body():
        c = Coordinator(stream(), groups_per_step=2, prompts_per_request=2, max_staleness=0)
        ps = (await acquire_now(c)).prompts
        await c.put([group(ps[0], 0)])
        task = asyncio.ensure_future(c.get_batch(0, timeout_s=30))
        await asyncio.sleep(0)  # let it take the one group and wait for the second
        while not task.done() and c.buffer:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(c.buffer) == 1
    run(body())


def test_weight_versions_never_go_back():
    async def body():
        c = Coordinator(stream(), groups_per_step=1, prompts_per_request=1, max_staleness=0)
        await c.publish(Payload(version=2, fingerprint="f"))
        with pytest.raises(ValueError, match="backwards"):
            await c.publish(Payload(version=1, fingerprint="f"))
        assert c.latest_weights().version == 2
    run(body())


def test_lost_worker_prompts_are_redispatched_once():
    async def body():
        c = Coordinator(stream(), groups_per_step=4, prompts_per_request=2, max_staleness=0)
        a = (await c.acquire("a", timeout_s=0.05)).prompts
        b = (await c.acquire("b", timeout_s=0.05)).prompts
        assert await c.reclaim("a") == 2  # worker a died holding two prompts
        again = (await c.acquire("b", timeout_s=0.05)).prompts
        assert [p.uid for p in again] == [p.uid for p in a], "lost prompts go out first, unchanged"
        assert c.issued_groups == 4, "re-dispatch is not a new prompt"
        # a's reward call still lands one of its groups late, then b returns both copies
        await c.put([group(a[0], 0, worker="a")])
        await c.put([group(p, 0, worker="b") for p in b + again])
        s = c.stats()
        assert s["dropped_by_reason"] == {"duplicate": 2}
        batch = await c.get_batch(0, timeout_s=1)
        assert sorted(g.prompt.uid for g in batch) == sorted(p.uid for p in a + b)
        s = await c.publish(Payload(version=1, fingerprint="f"), commit_groups=4)
        assert s["produced"] == s["trained"] + s["dropped"] == 10
    run(body())


def test_retired_worker_gets_no_more_prompts():
    async def body():
        c = Coordinator(stream(), groups_per_step=4, prompts_per_request=1, max_staleness=1)
        assert (await c.acquire("a", timeout_s=0.05))[0]
        await c.retire("a")
        assert (await c.acquire("a", timeout_s=0.05))[0] is None
        assert (await c.acquire("b", timeout_s=0.05))[0]
    run(body())


def test_acquire_parked_when_its_worker_is_lost_hands_out_nothing():
    """A worker dies while its acquire waits at the closed gate; the driver reclaims it;
    then new weights open the gate: the orphaned acquire must not take prompts (they
    would be in flight forever and the run would stall)."""
    async def body():
        c = Coordinator(stream(), groups_per_step=1, prompts_per_request=1, max_staleness=0)
        (p,) = (await c.acquire("b", timeout_s=0.05)).prompts  # the gate is now closed for version 0
        parked = asyncio.ensure_future(c.acquire("a", timeout_s=5.0))
        await asyncio.sleep(0)  # let it reach the gate
        assert not parked.done()
        assert await c.reclaim("a") == 0  # "a" died holding nothing
        await c.put([group(p, 0, worker="b")])
        await c.get_batch(0, timeout_s=1)
        await c.publish(Payload(version=1, fingerprint="f"), commit_groups=1)  # the gate opens
        assert (await asyncio.wait_for(parked, 1.0))[0] is None
        assert c.stats()["in_flight_by_worker"] == {}
        assert (await c.acquire("b", timeout_s=0.05))[0], "the prompt went to a live worker instead"
    run(body())


def test_a_group_put_twice_is_counted_once():
    """A rollout worker re-sends groups whose reward worker died; if that one had put them
    already, the second put is produced-and-dropped as ``duplicate``, never trained twice."""
    async def body():
        c = Coordinator(stream(), groups_per_step=2, prompts_per_request=2, max_staleness=0)
        ps = (await acquire_now(c)).prompts
        groups = [group(p, 0) for p in ps]
        await c.put(groups)
        await c.put([group(p, 0) for p in ps])  # the same prompts again
        s = c.stats()
        assert s["buffered_groups"] == 2 and s["dropped_by_reason"] == {"duplicate": 4}
        assert await c.get_batch(0, timeout_s=1) and (await acquire_now(c))[0] == []
        s = await c.publish(Payload(version=1, fingerprint="f"), commit_groups=2)
        assert (s["produced"], s["trained"], s["dropped"]) == (8, 4, 4)
    run(body())


def test_pause_closes_the_gate_and_an_unhealthy_sample_pauses_it_at_once():
    async def body():
        c = Coordinator(stream(), groups_per_step=4, prompts_per_request=1, max_staleness=0)
        await c.pause("operator")
        assert (await acquire_now(c))[0] == [] and c.stats()["paused"] == "operator"
        await c.pause(None)
        (p0,) = (await acquire_now(c)).prompts
        unhealthy = group(p0, 0, reward=None, excluded=Excluded(Exclusion.REWARD_UNHEALTHY, "'rm' circuit open"))
        await c.put([unhealthy])
        assert "circuit open" in c.stats()["paused"]
        assert (await acquire_now(c))[0] == [], "generating now would only produce samples lacking a term"
        await c.pause(None)  # the driver, once the model is disabled or removed
        assert len((await acquire_now(c))[0]) == 1
        stopping = asyncio.create_task(c.acquire("w", timeout_s=5))
        await c.pause("again")
        await c.stop()
        assert (await stopping)[0] is None, "a paused gate must still let workers stop"
    run(body())
