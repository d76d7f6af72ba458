"""Serve a reward model over gRPC (``fleetrl.reward.v1.RewardModel``).

Two backends: a Python reward callable (``module:function``, the same
contract as :mod:`actors.reward.worker`) and a Hugging Face sequence-classification
checkpoint (:class:`actors.reward.hf.HFRewardModel`). The request handling is
plain functions (:func:`score_request`, :func:`metadata_response`); the gRPC
servicer only maps their exceptions to status codes:

* ``ValueError`` (a bad request, e.g. no samples) -> ``INVALID_ARGUMENT``;
* more samples than ``--max-request-samples`` -> ``RESOURCE_EXHAUSTED``;
* a call still waiting when the server stops scoring (after ``--grace-s``) -> ``UNAVAILABLE``;
* a request its client abandoned (cancelled, deadline passed) -> dropped: it is
  checked before it is scored and between the backend's batches, so an
  abandoned request stops using the model within one batch;
* anything else, including a backend that raises or returns the wrong number
  of scores or a non-finite score -> ``INTERNAL``. A broken backend never
  becomes a wrong answer.

Auth, TLS, health, reflection, size limits, malformed-request handling and
shutdown come from :mod:`actors.serving`. ``fleetrl reward serve`` turns health
``NOT_SERVING`` at the first SIGTERM/SIGINT, even while a batch is being scored,
then drains in-flight calls for ``--grace-s``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import queue
import signal
import sys
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc

from actors.reward.functions import load_reward_fn
from actors.reward.scores import first_failure, validate_scores
from actors.serving import DEFAULT_MAX_MESSAGE_BYTES, RunningServer, ServerConfig, serve
from protos import reward_pb2, reward_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["RewardModel"].full_name
PROG = "fleetrl reward serve"
DEFAULT_MAX_REQUEST_SAMPLES = 4096


class BackendError(RuntimeError):
    """The backend failed or broke its contract (maps to INTERNAL, never INVALID_ARGUMENT)."""


class RequestTooLarge(ValueError):
    """More samples than the server accepts in one request (maps to RESOURCE_EXHAUSTED)."""


class RequestAbandoned(Exception):
    """The client cancelled the call or its deadline passed: scoring it further is wasted work."""


class ShuttingDown(RuntimeError):
    """The server stopped scoring before this call was scored (maps to UNAVAILABLE: a client may retry)."""


def _always() -> bool:
    return True


class CallableBackend:
    """A Python reward function ``fn(prompts, completions, **metadata) -> list[float]``.

    Calls are serialised (as in the reward worker, the function is never run
    concurrently with itself).
    """

    kind = "python-callable"

    def __init__(self, spec: str, *, name: str | None = None, max_batch_size: int = 0):
        self.spec = spec
        self.fn = load_reward_fn(spec)
        self.name = name or spec.rpartition(":")[2] or spec
        self.max_batch_size = max_batch_size
        self.chunk_size = max_batch_size  # 0: a request is one call (the function may look across samples)
        self._lock = threading.Lock()

    def score(self, prompts: list[str], completions: list[str], metadata: dict[str, list[str]],
              alive: Callable[[], bool] = _always) -> list[float]:
        with self._lock:
            return self.fn(prompts, completions, **metadata)

    def metadata(self) -> tuple[str, str, int, str]:
        module = sys.modules.get(getattr(self.fn, "__module__", None) or "")
        return self.name, str(getattr(module, "__version__", "")), self.max_batch_size, self.kind


class HFBackend:
    """A Hugging Face sequence-classification checkpoint: the one HF reward-model wrapper,
    :class:`actors.reward.hf.HFRewardModel` (also behind ``LocalRewardModel``)."""

    def __init__(self, path, *, name: str | None = None, device: str = "cpu", batch_size: int = 32,
                 max_length: int = 512):
        from actors.reward.hf import HFRewardModel

        self.model = HFRewardModel(path, device=device, batch_size=batch_size, max_length=max_length)
        self.name = name or Path(path).resolve().name
        self.chunk_size = batch_size  # samples score independently: a request is scored batch by batch

    def score(self, prompts: list[str], completions: list[str], metadata: dict[str, list[str]],
              alive: Callable[[], bool] = _always) -> list[float]:
        return self.model.score(prompts, completions, **metadata)

    def metadata(self) -> tuple[str, str, int, str]:
        return self.name, self.model.version, self.model.batch_size, self.model.kind


@dataclass
class _Job:
    prompts: list[str]
    completions: list[str]
    metadata: dict[str, list[str]]
    future: Future
    alive: Callable[[], bool]


class MainThreadRunner:
    """Runs a backend's ``score`` on the thread that calls ``run`` (the main thread in
    ``fleetrl reward serve``) and merges requests that wait at the same time into one
    call (dynamic batching). A job whose client is gone by the time it is reached is
    dropped unscored.

    Why: torch's intra-op parallelism gave no speed-up when the model ran on a
    gRPC worker thread (measured: README, "Measurements behind design choices").
    """

    def __init__(self, backend, max_merge: int = 256):
        self.backend = backend
        self.max_merge = max_merge
        self.chunk_size = getattr(backend, "chunk_size", 0)
        self.jobs: "queue.Queue[_Job]" = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()

    def metadata(self):
        return self.backend.metadata()

    def score(self, prompts, completions, metadata, alive: Callable[[], bool] = _always):
        fut: Future = Future()
        with self._lock:
            if self._closed:
                raise ShuttingDown("server shut down before this call was scored")
            self.jobs.put(_Job(prompts, completions, metadata, fut, alive))
        return fut.result()

    def run(self, done) -> None:
        """Serve queued calls until ``done()`` is true."""
        while not done():
            try:
                first = self.jobs.get(timeout=0.05)
            except queue.Empty:
                continue
            batch, n = [first], len(first.prompts)
            while n < self.max_merge:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                batch.append(job)
                n += len(job.prompts)
            live = [job for job in batch if job.alive()]
            for job in batch:
                if job not in live:
                    job.future.set_exception(RequestAbandoned("dropped before it was scored"))
            if live:
                self._score(live)

    def close(self, error: Exception) -> None:
        """Refuse new calls and fail every call still queued, so no handler waits forever."""
        with self._lock:
            self._closed = True
        while True:
            try:
                self.jobs.get_nowait().future.set_exception(error)
            except queue.Empty:
                return

    def _score(self, batch: list[_Job]) -> None:
        if len(batch) > 1:
            keys = sorted({k for job in batch for k in job.metadata})
            prompts = [p for job in batch for p in job.prompts]
            completions = [c for job in batch for c in job.completions]
            metadata = {k: [v for job in batch for v in job.metadata.get(k, [""] * len(job.prompts))]
                        for k in keys}
            try:
                scores = list(self.backend.score(prompts, completions, metadata))
                if len(scores) == len(prompts):
                    i = 0
                    for job in batch:
                        job.future.set_result(scores[i:i + len(job.prompts)])
                        i += len(job.prompts)
                    return
            except Exception:  # noqa: BLE001 - retry one by one so one bad request fails alone
                pass
        for job in batch:
            try:
                job.future.set_result(self.backend.score(job.prompts, job.completions, job.metadata))
            except Exception as e:  # noqa: BLE001 - delivered to the waiting gRPC handler
                job.future.set_exception(e)


def request_to_lists(request: reward_pb2.ScoreRequest) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """Prompts, completions and metadata (key -> list aligned to samples; a missing key -> "")."""
    samples = list(request.samples)
    keys = sorted({k for s in samples for k in s.metadata})
    metadata = {k: [s.metadata.get(k, "") for s in samples] for k in keys}
    return [s.prompt for s in samples], [s.completion for s in samples], metadata


def checked_scores(scores, n: int) -> list[float]:
    """Exactly ``n`` finite floats (``actors.reward.scores.validate_scores``, the check every
    reward path shares), or BackendError with the first reason."""
    result = validate_scores("backend", scores, n)
    bad = first_failure(result)
    if bad is not None:
        raise BackendError(str(bad))
    return result


def score_request(backend, request: reward_pb2.ScoreRequest, *,
                  max_samples: int = DEFAULT_MAX_REQUEST_SAMPLES,
                  alive: Callable[[], bool] = _always) -> reward_pb2.ScoreResponse:
    """Score every sample of ``request`` with ``backend``, ``backend.chunk_size`` samples at a
    time (0: all at once). ValueError if the request is empty, RequestTooLarge above
    ``max_samples`` (0: no cap), RequestAbandoned as soon as ``alive()`` is false before a chunk."""
    n = len(request.samples)
    if not n:
        raise ValueError("ScoreRequest has no samples")
    if max_samples and n > max_samples:
        raise RequestTooLarge(f"ScoreRequest has {n} samples, more than this server accepts in one request "
                              f"(--max-request-samples {max_samples}): split it")
    prompts, completions, metadata = request_to_lists(request)
    log.debug("score request %s: %d samples", request.request_id or "-", n)
    step = getattr(backend, "chunk_size", 0) or n
    scores: list[float] = []
    for i in range(0, n, step):
        if not alive():
            raise RequestAbandoned(f"after {i} of {n} samples")
        part = slice(i, i + step)
        try:
            raw = backend.score(prompts[part], completions[part], {k: v[part] for k, v in metadata.items()},
                                alive=alive)
        except RequestAbandoned as e:
            raise RequestAbandoned(f"after {i} of {n} samples ({e})") from None
        except ShuttingDown:
            raise
        except Exception as e:  # a backend may raise anything; it is never the client's fault
            raise BackendError(f"backend raised {type(e).__name__}: {e}") from e
        scores += checked_scores(raw, len(prompts[part]))
    return reward_pb2.ScoreResponse(scores=scores)


def metadata_response(backend) -> reward_pb2.ModelMetadata:
    name, version, max_batch_size, kind = backend.metadata()
    return reward_pb2.ModelMetadata(name=name, version=version, max_batch_size=max_batch_size, kind=kind)


def _abort(context, e: Exception, request_id: str = ""):
    if isinstance(e, ShuttingDown):
        context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
    if isinstance(e, RequestTooLarge):
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
    if isinstance(e, ValueError):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    log.error("reward request %s failed: %s", request_id or "-", e, exc_info=not isinstance(e, BackendError))
    context.abort(grpc.StatusCode.INTERNAL, str(e) if isinstance(e, BackendError) else f"{type(e).__name__}: {e}")


class RewardModelServicer(reward_pb2_grpc.RewardModelServicer):
    """Thin gRPC adapter over :func:`score_request` and :func:`metadata_response`."""

    def __init__(self, backend, max_request_samples: int = DEFAULT_MAX_REQUEST_SAMPLES):
        self.backend = backend
        self.max_request_samples = max_request_samples

    def Score(self, request, context):
        def alive() -> bool:
            remaining = context.time_remaining()
            return context.is_active() and (remaining is None or remaining > 0)

        try:
            return score_request(self.backend, request, max_samples=self.max_request_samples, alive=alive)
        except RequestAbandoned as e:
            log.info("reward request %s abandoned by its client: dropped %s", request.request_id or "-", e)
            context.abort(grpc.StatusCode.CANCELLED, f"request abandoned by the client: dropped {e}")
        except Exception as e:
            _abort(context, e, request.request_id)

    def GetMetadata(self, request, context):
        try:
            return metadata_response(self.backend)
        except Exception as e:
            _abort(context, e)


def start_reward_server(backend, cfg: ServerConfig,
                        max_request_samples: int = DEFAULT_MAX_REQUEST_SAMPLES) -> RunningServer:
    """Serve ``backend`` as ``fleetrl.reward.v1.RewardModel`` (plus health and reflection)."""
    servicer = RewardModelServicer(backend, max_request_samples)
    return serve(cfg, lambda server: reward_pb2_grpc.add_RewardModelServicer_to_server(servicer, server),
                 [SERVICE_NAME])


def _bounded(kind, what: str, low, high=None):
    """An argparse ``type``: ``kind`` parsed and within ``[low, high]``, else a one-line usage error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what}, got {text!r}") from None
        if not (math.isfinite(value) and value >= low and (high is None or value <= high)):
            raise argparse.ArgumentTypeError(f"{what}, got {text!r}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Serve a reward model over gRPC (fleetrl.reward.v1).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="DIR", help="Hugging Face sequence-classification checkpoint (safetensors)")
    src.add_argument("--function", metavar="MODULE:FUNCTION", help="Python reward function or built-in name")
    p.add_argument("--name", help="name reported by GetMetadata (default: folder or function name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (without a token: loopback only)")
    p.add_argument("--port", type=_bounded(int, "must be 1..65535, or 0 for a free port", 0, 65535), default=0,
                   help="port to bind, 1..65535; 0 picks a free one (printed)")
    p.add_argument("--token-file", help="bearer token file (default: $FLEETRL_TOKEN)")
    p.add_argument("--tls-cert", help="PEM certificate chain (with --tls-key)")
    p.add_argument("--tls-key", help="PEM private key (with --tls-cert)")
    p.add_argument("--max-message-bytes", type=_bounded(int, "must be an integer >= 1", 1),
                   default=DEFAULT_MAX_MESSAGE_BYTES, help="largest request/response accepted")
    p.add_argument("--max-request-samples", type=_bounded(int, "must be an integer >= 1", 1),
                   default=DEFAULT_MAX_REQUEST_SAMPLES,
                   help="most samples in one Score request (more: RESOURCE_EXHAUSTED)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="model batch size (--model, default 32); advertised as max_batch_size")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device for --model")
    p.add_argument("--grace-s", type=_bounded(float, "must be a number >= 0", 0.0), default=5.0,
                   help="seconds in-flight calls get at shutdown")
    return p


def make_backend(args: argparse.Namespace):
    """The backend the parsed arguments ask for; ValueError if it cannot be built."""
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    if args.model:
        return HFBackend(args.model, name=args.name, device=args.device, batch_size=args.batch_size or 32)
    return CallableBackend(args.function, name=args.name, max_batch_size=args.batch_size or 0)


@contextlib.contextmanager
def _stop_on_signal():
    """Yield an Event set by SIGTERM/SIGINT (main thread only); restores the previous handlers."""
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _fail(error) -> int:
    lines = str(error).strip().splitlines() or [type(error).__name__]
    print(f"{PROG}: error: {lines[0]}", file=sys.stderr)
    return 2


def main_serve(argv: list[str]) -> int:
    """``fleetrl reward serve``: start, print the address line, serve until SIGTERM/SIGINT."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed usage and the error
        return int(e.code or 0)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    cfg = ServerConfig(host=args.host, port=args.port, token_file=args.token_file, tls_cert=args.tls_cert,
                       tls_key=args.tls_key, max_message_bytes=args.max_message_bytes)
    try:
        backend = make_backend(args)  # may take long (a big checkpoint)
    except (ValueError, OSError) as e:  # refused checkpoint, bad function spec: the message says it all
        return _fail(e)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - e.g. a corrupt safetensors file: one line, no traceback
        what = f"--model {args.model}" if args.model else f"--function {args.function}"
        return _fail(f"cannot load {what}: {type(e).__name__}: {e}")
    runner = MainThreadRunner(backend)
    with _stop_on_signal() as stop:  # before the address line: a signal right after it must not kill us
        try:
            running = start_reward_server(runner, cfg, max_request_samples=args.max_request_samples)
        except (ValueError, OSError, RuntimeError) as e:  # bind failure, unreadable token or TLS files
            return _fail(e)
        print(f"fleetrl reward server {backend.metadata()[0]} listening on {running.address}", flush=True)

        def shut_down() -> None:  # at the first signal, not after the batch being scored
            stop.wait()
            log.info("shutting down: health NOT_SERVING, in-flight calls get %ss", args.grace_s)
            running.stop(args.grace_s)

        stopper = threading.Thread(target=shut_down, name="reward-server-stop", daemon=True)
        stopper.start()
        try:
            runner.run(lambda: not stopper.is_alive())  # in-flight calls are scored here while the server drains
        finally:
            runner.close(ShuttingDown("server shut down before this call was scored"))
            stop.set()
            stopper.join()
    return 0
