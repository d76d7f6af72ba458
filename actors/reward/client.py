"""Clients of reward models registered while training runs.

``RemoteRewardClient`` calls a ``fleetrl.reward.v1.RewardModel`` server:

* batches samples into ``batch_size`` calls, each with a deadline (``timeout_s``);
* retries only on UNAVAILABLE, with exponential backoff, inside the deadline;
* validates every response: exactly one finite score per sample;
* a **circuit breaker**: after ``failure_threshold`` consecutive failed calls
  the model is *unhealthy* and calls fail fast for ``cooldown_s``; then one
  trial call is let through, and a success closes the circuit again.

A failure never becomes a score: the affected samples get a reason string
(``reward_timeout: ...``, ``reward_unavailable: ...``, ``reward_unhealthy: ...``,
``reward_count: ...``, ``reward_nonfinite: ...``) and are excluded upstream.

The spec and the local-checkpoint model with the same interface are in
``actors.reward.models``.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

import grpc

from actors.reward.scores import validate_scores
from actors.serving import channel, client_metadata, load_token

if TYPE_CHECKING:
    from actors.reward.models import RewardModelSpec

Result = list  # list[float | str]: a score, or why the sample could not be scored


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

    def snapshot(self) -> dict:
        with self.lock:
            return {"scored": self.scored, "failed": self.failed,
                    "reward_mean": self.total / self.scored if self.scored else 0.0, "last_error": self.last_error}


class CircuitBreaker:
    """closed -> (threshold consecutive failures) -> open -> (cooldown) -> half-open trial."""

    def __init__(self, threshold: int, cooldown_s: float, clock=time.monotonic):
        self.threshold, self.cooldown_s, self.clock = threshold, cooldown_s, clock
        self.failures = 0
        self.opened_at: float | None = None
        self.trial = False  # one caller is testing the server while the circuit is open
        self.lock = threading.Lock()

    @property
    def healthy(self) -> bool:
        return self.opened_at is None

    def allow(self) -> bool:
        """Closed: yes. Open: no, except one trial call per cooldown."""
        with self.lock:
            if self.opened_at is None:
                return True
            if not self.trial and self.clock() - self.opened_at >= self.cooldown_s:
                self.trial = True
                return True
            return False

    def record(self, success: bool) -> None:
        with self.lock:
            self.trial = False
            if success:
                self.failures, self.opened_at = 0, None
                return
            self.failures += 1
            if self.failures >= self.threshold or self.opened_at is not None:  # a failed trial re-opens
                self.opened_at = self.clock()


class RemoteRewardClient:
    """Scores samples with a remote RewardModel server (see module docstring)."""

    def __init__(self, spec: RewardModelSpec):
        from protos import reward_pb2_grpc

        self.spec = spec
        self.token = spec.token or (load_token(spec.token_file, env="FLEETRL_REWARD_TOKEN") if spec.token_file else None)
        self.channel = channel(spec.endpoint, tls_ca=spec.tls_ca)
        self.stub = reward_pb2_grpc.RewardModelStub(self.channel)
        self.breaker = CircuitBreaker(spec.failure_threshold, spec.cooldown_s)
        self.stats = RewardStats()

    def close(self) -> None:
        self.channel.close()

    def info(self) -> dict:
        return {"healthy": self.breaker.healthy, **self.stats.snapshot()}

    def probe(self) -> dict:
        """GetMetadata with the call deadline; raises ``grpc.RpcError`` if the server
        cannot be reached, refuses our token, or does not serve RewardModel."""
        from protos import reward_pb2

        md = self.stub.GetMetadata(reward_pb2.GetMetadataRequest(), timeout=min(self.spec.timeout_s, 30.0),
                                   metadata=client_metadata(self.token))
        return {"name": md.name, "version": md.version, "kind": md.kind, "max_batch_size": md.max_batch_size}

    def score(self, prompts: list[str], completions: list[str], metadata: dict[str, list]) -> Result:
        out: Result = []
        bs = max(1, self.spec.batch_size)
        for i in range(0, len(prompts), bs):
            sl = slice(i, i + bs)
            out += self._score_batch(prompts[sl], completions[sl], {k: v[sl] for k, v in metadata.items()})
        return out

    def _request(self, prompts, completions, metadata):
        from protos import reward_pb2

        samples = []
        for j, (p, c) in enumerate(zip(prompts, completions)):
            md = {k: "" if v[j] is None else str(v[j]) for k, v in metadata.items()}
            samples.append(reward_pb2.Sample(prompt=p, completion=c, metadata=md))
        return reward_pb2.ScoreRequest(samples=samples)

    def _score_batch(self, prompts, completions, metadata) -> Result:
        name, n = self.spec.name, len(prompts)
        if not self.breaker.allow():
            reason = f"reward_unhealthy: {name!r} circuit open after {self.breaker.failures} failed calls, " \
                     f"last: {self.stats.last_error}"
            self.stats.fail(n, reason, cause=False)
            return [reason] * n
        request = self._request(prompts, completions, metadata)
        deadline = time.monotonic() + self.spec.timeout_s
        backoff = 0.1
        attempt = 0
        while True:
            attempt += 1
            left = deadline - time.monotonic()
            try:
                response = self.stub.Score(request, timeout=max(left, 0.001),
                                           metadata=client_metadata(self.token))
                result = validate_scores(name, response.scores, n)
                break
            except grpc.RpcError as e:
                code = e.code()
                retry = code == grpc.StatusCode.UNAVAILABLE and attempt < self.spec.max_attempts \
                    and deadline - time.monotonic() > backoff
                if retry:
                    time.sleep(backoff)
                    backoff *= 2
                    continue
                kind = {grpc.StatusCode.DEADLINE_EXCEEDED: "reward_timeout",
                        grpc.StatusCode.UNAVAILABLE: "reward_unavailable"}.get(code, "reward_error")
                result = [f"{kind}: {name!r} {code.name} after {attempt} attempt(s): {e.details()}"] * n
                break
        ok = all(not isinstance(r, str) for r in result)
        self.breaker.record(ok)
        if ok:
            self.stats.ok(result)
        else:
            self.stats.fail(n, next(r for r in result if isinstance(r, str)))
        return result


