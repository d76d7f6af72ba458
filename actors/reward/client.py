"""Clients of reward models registered while training runs.

``RemoteRewardClient`` calls a ``fleetrl.reward.v1.RewardModel`` server:

* batches samples into ``batch_size`` calls, each with a deadline (``timeout_s``)
  and a fresh ``request_id`` (a UUID the server logs; it is also in our reasons);
* sends the token ids of every sample along with its text;
* retries only on UNAVAILABLE, with exponential backoff, at most
  ``max_attempts`` tries, inside the deadline;
* validates every response once (``scores.validate_scores``): exactly one
  finite score per sample;
* a **circuit breaker**: after ``failure_threshold`` consecutive failed calls
  the model is *unhealthy* and calls fail fast for ``cooldown_s``; then one
  trial call is let through, and a success closes the circuit again. While
  the circuit is open the run sends no traffic (rollout pauses), so the
  driver asks for the trial itself (``trial``: one sample of the last batch).

A failure never becomes a score: the affected samples get an ``Excluded``
(``reward_timeout``, ``reward_unavailable``, ``reward_unhealthy``,
``reward_count``, ``reward_nonfinite``, ...) and are excluded upstream.

The spec and the local-checkpoint model with the same interface are in
``actors.reward.models``.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import TYPE_CHECKING

import grpc

from actors.reward.scores import Result, ScoreBatch, excluded, first_failure, validate_scores
from actors.serving import CircuitBreaker, channel, client_metadata  # noqa: F401 - CircuitBreaker: this module's API too
from actors.types import Exclusion

if TYPE_CHECKING:
    from actors.reward.models import RewardModelSpec

BACKOFF_S = 0.1
"""Sleep before the first retry; doubled before each further one."""
_KIND_OF_CODE = {grpc.StatusCode.DEADLINE_EXCEEDED: Exclusion.REWARD_TIMEOUT,
                 grpc.StatusCode.UNAVAILABLE: Exclusion.REWARD_UNAVAILABLE}


class RewardStats:
    """Counters one reward model reports through Control (thread-safe)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.scored = 0
        self.failed = 0
        self.total = 0.0
        self.last_error = ""

    def ok(self, scores: list[float]) -> None:
        with self.lock:
            self.scored += len(scores)
            self.total += sum(scores)

    def fail(self, n: int, reason: str, *, cause: bool = True) -> None:
        """Count ``n`` flagged samples; ``cause=False`` keeps last_error (a fail-fast
        while the circuit is open is not a new cause)."""
        with self.lock:
            self.failed += n
            if cause:
                self.last_error = reason

    def record(self, result: Result, *, cause: bool = True) -> None:
        """Count one call's result: all scored, or all flagged with its first reason."""
        bad = first_failure(result)
        if bad is None:
            self.ok(result)
        else:
            self.fail(len(result), str(bad), cause=cause)

    def snapshot(self) -> dict:
        with self.lock:
            return {"scored": self.scored, "failed": self.failed,
                    "reward_mean": self.total / self.scored if self.scored else 0.0, "last_error": self.last_error}


class ProbeError(Exception):
    """A reward model failed its registration probe: ``code`` (a gRPC status code name, or
    the exception type for a local checkpoint) and ``details`` -- plain strings, so it
    pickles across Ray; ``str()`` is ``"CODE: details"``."""

    def __init__(self, code: str, details: str):
        super().__init__(code, details)
        self.code, self.details = code, details

    def __str__(self) -> str:
        return f"{self.code}: {self.details}"


class RemoteRewardClient:
    """Scores samples with a remote RewardModel server (see module docstring)."""

    def __init__(self, spec: RewardModelSpec, *, clock=time.monotonic):
        from protos import reward_pb2_grpc

        self.spec = spec
        self.token = spec.token
        self.channel = channel(spec.endpoint, tls_ca=spec.tls_ca)
        self.stub = reward_pb2_grpc.RewardModelStub(self.channel)
        self.breaker = CircuitBreaker(spec.failure_threshold, spec.cooldown_s, clock=clock)
        self.stats = RewardStats()
        self.last_sample: ScoreBatch | None = None  # one sample of the last batch: the trial call's

    def close(self) -> None:
        self.channel.close()

    def info(self) -> dict:
        return {"healthy": self.breaker.healthy, **self.stats.snapshot()}

    def probe(self) -> dict:
        """GetMetadata with the call deadline; raises ``ProbeError`` (plain, picklable: it
        crosses Ray intact, unlike grpc's ``_InactiveRpcError``) with the gRPC code name and
        details if the server cannot be reached, refuses our token, or does not serve RewardModel."""
        from protos import reward_pb2

        try:
            md = self.stub.GetMetadata(reward_pb2.GetMetadataRequest(), timeout=min(self.spec.timeout_s, 30.0),
                                       metadata=client_metadata(self.token))
        except grpc.RpcError as e:
            raise ProbeError(e.code().name, e.details() or "") from None
        return {"name": md.name, "version": md.version, "kind": md.kind, "max_batch_size": md.max_batch_size}

    def score(self, batch: ScoreBatch) -> Result:
        out: Result = []
        bs = max(1, self.spec.batch_size)
        for i in range(0, len(batch), bs):
            out += self._score_batch(batch.slice(slice(i, i + bs)))
        return out

    def trial(self) -> bool:
        """The half-open trial without traffic (rollout pauses while the circuit is open):
        once the cooldown has passed, one real Score call with one sample of the last batch;
        its result opens or closes the circuit and is counted nowhere else. Returns healthy."""
        if self.breaker.healthy or self.last_sample is None or not self.breaker.allow():
            return self.breaker.healthy
        result = self._call(to_request(self.last_sample))
        self.breaker.record(first_failure(result) is None)
        if first_failure(result) is not None:
            self.stats.fail(0, str(first_failure(result)))
        return self.breaker.healthy

    def _score_batch(self, batch: ScoreBatch) -> Result:
        name, n = self.spec.name, len(batch)
        self.last_sample = batch.slice(slice(0, 1))
        if not self.breaker.allow():
            result = excluded(n, Exclusion.REWARD_UNHEALTHY, f"{name!r} circuit open after "
                              f"{self.breaker.failures} failed calls, last: {self.stats.last_error}")
            self.stats.record(result, cause=False)
            return result
        result = self._call(to_request(batch))
        self.breaker.record(first_failure(result) is None)
        self.stats.record(result)
        return result

    def _call(self, request) -> Result:
        """One Score call: retries on UNAVAILABLE (back-off, ``max_attempts``, inside the deadline)."""
        name, n = self.spec.name, len(request.samples)
        deadline = time.monotonic() + self.spec.timeout_s
        backoff, attempt = BACKOFF_S, 0
        while True:
            attempt += 1
            try:
                response = self.stub.Score(request, timeout=max(deadline - time.monotonic(), 0.001),
                                           metadata=client_metadata(self.token))
                return validate_scores(name, response.scores, n)
            except grpc.RpcError as e:
                code = e.code()
                if code == grpc.StatusCode.UNAVAILABLE and attempt < self.spec.max_attempts \
                        and deadline - time.monotonic() > backoff:
                    time.sleep(backoff)
                    backoff *= 2
                    continue
                return excluded(n, _KIND_OF_CODE.get(code, Exclusion.REWARD_ERROR),
                                f"{name!r} {code.name} after {attempt} attempt(s) (request {request.request_id}): "
                                f"{e.details()}")


def to_request(batch: ScoreBatch):
    """The ``ScoreRequest`` for ``batch``: text, token ids (when known), metadata as strings."""
    from protos import reward_pb2

    samples = []
    for j, (p, c) in enumerate(zip(batch.prompts, batch.completions)):
        md = {k: "" if v[j] is None else str(v[j]) for k, v in batch.metadata.items()}
        samples.append(reward_pb2.Sample(
            prompt=p, completion=c, metadata=md,
            prompt_token_ids=batch.prompt_ids[j] if j < len(batch.prompt_ids) else (),
            completion_token_ids=batch.completion_ids[j] if j < len(batch.completion_ids) else ()))
    return reward_pb2.ScoreRequest(samples=samples, request_id=uuid.uuid4().hex)
