"""Serve a reward model over gRPC (``fleetrl.reward.v1.RewardModel``).

Two backends: a Python reward callable (``module:function``, the same
contract as :mod:`actors.reward.worker`) and a Hugging Face sequence-classification
checkpoint (:class:`actors.reward.hf.HFRewardModel`). The request handling is
plain functions (:func:`score_request`, :func:`metadata_response`); the gRPC
servicer only maps their exceptions to status codes:

* ``ValueError`` (a bad request, e.g. no samples) -> ``INVALID_ARGUMENT``;
* anything else, including a backend that raises or returns the wrong number
  of scores or a non-finite score -> ``INTERNAL``. A broken backend never
  becomes a wrong answer.

Auth, TLS, health, reflection, size limits and shutdown come from
:mod:`actors.serving`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from pathlib import Path

import grpc

from actors.reward.functions import load_reward_fn
from actors.reward.scores import first_failure, validate_scores
from actors.serving import DEFAULT_MAX_MESSAGE_BYTES, RunningServer, ServerConfig, serve
from protos import reward_pb2, reward_pb2_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = reward_pb2.DESCRIPTOR.services_by_name["RewardModel"].full_name
PROG = "fleetrl reward serve"


class BackendError(RuntimeError):
    """The backend failed or broke its contract (maps to INTERNAL, never INVALID_ARGUMENT)."""


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
        self._lock = threading.Lock()

    def score(self, prompts: list[str], completions: list[str], metadata: dict[str, list[str]]) -> list[float]:
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

    def score(self, prompts: list[str], completions: list[str], metadata: dict[str, list[str]]) -> list[float]:
        return self.model.score(prompts, completions, **metadata)

    def metadata(self) -> tuple[str, str, int, str]:
        return self.name, self.model.version, self.model.batch_size, self.model.kind


class MainThreadRunner:
    """Runs a backend's ``score`` on the thread that calls ``run`` (the main thread in
    ``fleetrl reward serve``) and merges requests that wait at the same time into one
    call (dynamic batching).

    Why: torch's intra-op parallelism gave no speed-up when the model ran on a
    gRPC worker thread (measured: README, "Measurements behind design choices").
    """

    def __init__(self, backend, max_merge: int = 256):
        import queue

        self.backend = backend
        self.max_merge = max_merge
        self.jobs: "queue.Queue" = queue.Queue()

    def metadata(self):
        return self.backend.metadata()

    def score(self, prompts, completions, metadata):
        from concurrent.futures import Future

        fut: Future = Future()
        self.jobs.put((prompts, completions, metadata, fut))
        return fut.result()

    def run(self, done) -> None:
        """Serve queued calls until ``done()`` is true."""
        import queue

        while not done():
            try:
                first = self.jobs.get(timeout=0.05)
            except queue.Empty:
                continue
            batch, n = [first], len(first[0])
            while n < self.max_merge:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                batch.append(job)
                n += len(job[0])
            self._score(batch)

    def fail_pending(self, error: Exception) -> None:
        """Fail every call still queued (after shutdown), so no handler waits forever."""
        import queue

        while True:
            try:
                *_, fut = self.jobs.get_nowait()
            except queue.Empty:
                return
            fut.set_exception(error)

    def _score(self, batch) -> None:
        if len(batch) > 1:
            keys = sorted({k for job in batch for k in job[2]})
            prompts = [p for job in batch for p in job[0]]
            completions = [c for job in batch for c in job[1]]
            metadata = {k: [v for job in batch for v in job[2].get(k, [""] * len(job[0]))] for k in keys}
            try:
                scores = list(self.backend.score(prompts, completions, metadata))
                if len(scores) == len(prompts):
                    i = 0
                    for job in batch:
                        job[3].set_result(scores[i:i + len(job[0])])
                        i += len(job[0])
                    return
            except Exception:  # noqa: BLE001 - retry one by one so one bad request fails alone
                pass
        for prompts, completions, metadata, fut in batch:
            try:
                fut.set_result(self.backend.score(prompts, completions, metadata))
            except Exception as e:  # noqa: BLE001 - delivered to the waiting gRPC handler
                fut.set_exception(e)


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


def score_request(backend, request: reward_pb2.ScoreRequest) -> reward_pb2.ScoreResponse:
    """Score every sample of ``request`` with ``backend``; ValueError if the request is empty."""
    if not request.samples:
        raise ValueError("ScoreRequest has no samples")
    prompts, completions, metadata = request_to_lists(request)
    log.debug("score request %s: %d samples", request.request_id or "-", len(prompts))
    try:
        raw = backend.score(prompts, completions, metadata)
    except Exception as e:  # a backend may raise anything; it is never the client's fault
        raise BackendError(f"backend raised {type(e).__name__}: {e}") from e
    return reward_pb2.ScoreResponse(scores=checked_scores(raw, len(prompts)))


def metadata_response(backend) -> reward_pb2.ModelMetadata:
    name, version, max_batch_size, kind = backend.metadata()
    return reward_pb2.ModelMetadata(name=name, version=version, max_batch_size=max_batch_size, kind=kind)


def _abort(context, e: Exception, request_id: str = ""):
    if isinstance(e, ValueError):
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
    log.error("reward request %s failed: %s", request_id or "-", e, exc_info=not isinstance(e, BackendError))
    context.abort(grpc.StatusCode.INTERNAL, str(e) if isinstance(e, BackendError) else f"{type(e).__name__}: {e}")


class RewardModelServicer(reward_pb2_grpc.RewardModelServicer):
    """Thin gRPC adapter over :func:`score_request` and :func:`metadata_response`."""

    def __init__(self, backend):
        self.backend = backend

    def Score(self, request, context):
        try:
            return score_request(self.backend, request)
        except Exception as e:
            _abort(context, e, request.request_id)

    def GetMetadata(self, request, context):
        try:
            return metadata_response(self.backend)
        except Exception as e:
            _abort(context, e)


def start_reward_server(backend, cfg: ServerConfig) -> RunningServer:
    """Serve ``backend`` as ``fleetrl.reward.v1.RewardModel`` (plus health and reflection)."""
    servicer = RewardModelServicer(backend)
    return serve(cfg, lambda server: reward_pb2_grpc.add_RewardModelServicer_to_server(servicer, server),
                 [SERVICE_NAME])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Serve a reward model over gRPC (fleetrl.reward.v1).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="DIR", help="Hugging Face sequence-classification checkpoint (safetensors)")
    src.add_argument("--function", metavar="MODULE:FUNCTION", help="Python reward function or built-in name")
    p.add_argument("--name", help="name reported by GetMetadata (default: folder or function name)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (without a token: loopback only)")
    p.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one (printed)")
    p.add_argument("--token-file", help="bearer token file (default: $FLEETRL_TOKEN)")
    p.add_argument("--tls-cert", help="PEM certificate chain (with --tls-key)")
    p.add_argument("--tls-key", help="PEM private key (with --tls-cert)")
    p.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                   help="largest request/response accepted")
    p.add_argument("--batch-size", type=int, default=None,
                   help="model batch size (--model, default 32); advertised as max_batch_size")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device for --model")
    p.add_argument("--grace-s", type=float, default=5.0, help="seconds in-flight calls get at shutdown")
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
    print(f"{PROG}: error: {error}", file=sys.stderr)
    return 2


def main_serve(argv: list[str]) -> int:
    """``fleetrl reward serve``: start, print the address line, serve until SIGTERM/SIGINT."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed usage and the error
        return int(e.code or 0)
    if args.max_message_bytes < 1:
        parser.print_usage(sys.stderr)
        return _fail("--max-message-bytes must be >= 1")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    cfg = ServerConfig(host=args.host, port=args.port, token_file=args.token_file, tls_cert=args.tls_cert,
                       tls_key=args.tls_key, max_message_bytes=args.max_message_bytes)
    try:
        backend = make_backend(args)  # may take long (a big checkpoint): Ctrl-C still interrupts it
    except (ValueError, OSError, RuntimeError) as e:  # refused checkpoint, bad function spec
        return _fail(e)
    runner = MainThreadRunner(backend)
    with _stop_on_signal() as stop:  # before the address line: a signal right after it must not kill us
        try:
            running = start_reward_server(runner, cfg)
        except (ValueError, OSError, RuntimeError) as e:  # bind failure, unreadable token or TLS files
            return _fail(e)
        print(f"fleetrl reward server {backend.metadata()[0]} listening on {running.address}", flush=True)
        stopper = threading.Thread(target=running.stop, args=(args.grace_s,))
        try:
            runner.run(stop.is_set)
        finally:
            stopper.start()  # in-flight calls still need this thread to score them while the server drains
            runner.run(lambda: not stopper.is_alive())
            runner.fail_pending(RuntimeError("server shut down before this call was scored"))
    return 0
