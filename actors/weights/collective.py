"""Weight sync by a collective broadcast (NCCL between GPUs, gloo otherwise), beside the object store.

Ranks. The learner is rank 0; the rollout workers of the current group are
ranks 1..N of a ``torch.distributed`` process group made for weight sync only
(a standalone process group, not the default one, which an in-process vLLM
engine owns; the learner serves its ``TCPStore`` on its node IP and every group
uses a fresh key prefix). The
driver (``learner.driver.weight_sync.CollectiveSync``) builds groups and starts each broadcast; ranks never
decide membership themselves.

Invariant (on top of ``actors.weights.object_store``'s, which holds word for word):

1. **One group per epoch.** The members of an epoch never change. Any change of
   the rollout workers (scale up or down, retirement, replacement) and any
   failed collective makes the driver build a new group (epoch + 1) from the
   workers present at the next sync. Every call names its epoch; a rank refuses
   a call for an epoch it is not in.
2. **Staging.** A broadcast of version ``v`` sends ``[v]``, then the learner's
   wire buffers (one per dtype, as raw bytes). Receivers write into a *staging*
   copy, never into parameters a generate call may be reading; their
   ``staged_version`` is cleared before the first byte arrives and set to ``v``
   only once every byte of ``v`` has.
3. **The version travels on the control path.** The driver hands the
   coordinator ``Payload(v)`` without refs only after rank 0 and every member
   returned from the broadcast of ``v``. Between generate calls a worker applies
   a staged version ``>=`` the announced one (one device-local copy) and then
   reports exactly the staged version, so "version ``v`` iff bit-for-bit payload
   ``v``" still holds.
4. **Fallback: workers outside the group use the object store.** Before a worker
   created since the last build starts, the driver publishes the current version
   through the object store too (same version, same bytes); the next sync builds
   a group that includes it. A failed sync also publishes that version through
   the object store. So every announced version is either staged on every
   worker of the fleet or has refs.
5. **No hangs.** The rendezvous and every collective run under the group's
   timeout (``train.weight_sync_timeout_s``). A dead or stuck rank makes the sync
   raise ``CollectiveSyncError`` naming it, after waiting (bounded) for the
   other ranks to return; the group is then discarded.

Backend: ``nccl`` when the learner and every member run on CUDA, each on a
different GPU (NCCL refuses two ranks on one GPU, "Duplicate GPU detected");
``gloo`` otherwise (gloo moves CUDA tensors through host memory).
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from actors.weights.flat import FlatParams
from actors.weights.payload import Payload
from actors.weights.object_store import WeightPublisher, WeightReceiver

STORE_PREFIX = "fleetrl-weights"


class CollectiveSyncError(RuntimeError):
    """A weight-sync group could not be built or a broadcast failed; the message names the ranks."""


class CollectiveConfigError(CollectiveSyncError):
    """The collective path cannot work with this setup (backend, devices, layouts): retrying will not help."""


@dataclass(frozen=True)
class GroupSpec:
    epoch: int
    host: str
    port: int
    world_size: int
    backend: str
    timeout_s: float
    fingerprint: str
    """Layout fingerprint of the learner's wire buffers; members must hold the same."""


def device_info(device: torch.device, fingerprint: str) -> dict:
    """What the driver needs to choose a backend: where this rank's weights live."""
    info = {"host": socket.gethostname(), "pid": os.getpid(), "device": device.type, "gpu": None,
            "fingerprint": fingerprint}
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        uuid = getattr(props, "uuid", None)
        info["gpu"] = str(uuid) if uuid is not None else \
            f"{info['host']}:{os.environ.get('CUDA_VISIBLE_DEVICES', '')}:{idx}"
        info["gpu_name"] = props.name
    return info


class _Rank:
    """This process's membership in the current weight-sync group.

    The group is a standalone ``ProcessGroupGloo`` / ``ProcessGroupNCCL`` over the learner's
    store, never this process's *default* group: an in-process vLLM engine owns that one
    (it initialises ``torch.distributed`` for its own ranks)."""

    def __init__(self):
        self.epoch: int | None = None
        self.backend: str | None = None
        self.group = None
        self.lock = threading.Lock()  # one collective operation at a time (join vs. a late broadcast)

    def join(self, spec: GroupSpec, rank: int, device: torch.device, store=None) -> None:
        with self.lock:
            self.leave_locked()
            timeout = timedelta(seconds=spec.timeout_s)
            if store is None:
                store = dist.TCPStore(spec.host, spec.port, None, False, timeout)
            prefixed = dist.PrefixStore(f"{STORE_PREFIX}/{spec.epoch}/", store)
            if spec.backend == "nccl":
                self.group = _nccl_group(prefixed, rank, spec.world_size, timeout, device, f"fleetrl-weights-{spec.epoch}")
            else:
                self.group = dist.ProcessGroupGloo(prefixed, rank, spec.world_size, timeout)
                self.group.barrier().wait()  # every member connected: a missing one fails here, at the join
            self.epoch, self.backend = spec.epoch, spec.backend

    def leave_locked(self) -> None:
        """Leave the current group (the caller holds ``self.lock``)."""
        if self.group is not None:
            try:
                self.group.shutdown()
            except Exception:  # a group broken by a dead peer may not shut down cleanly; drop it anyway
                pass
        self.group = None
        self.epoch = self.backend = None

    def check(self, epoch: int, who: str) -> None:
        if self.epoch != epoch:
            raise CollectiveSyncError(f"{who} is in weight-sync group epoch {self.epoch}, asked for epoch {epoch}")

    def broadcast(self, tensors: list[torch.Tensor], version: int | None, device: torch.device) -> int:
        """Rank 0 sends ``version`` then ``tensors``; other ranks receive into ``tensors``.
        Returns the version. Blocks until this rank's part is done (CUDA included)."""
        header = torch.tensor([-1 if version is None else version], dtype=torch.int64, device=device)
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self.group.broadcast([header], opts).wait()
        for t in tensors:
            self.group.broadcast([t.view(-1).view(torch.uint8)], opts).wait()  # raw bytes: exact for every dtype
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return int(header.item())


def _nccl_group(store, rank: int, world_size: int, timeout: timedelta, device: torch.device, name: str):
    """A standalone NCCL group with an eager communicator (a duplicate GPU fails at the join)."""
    # a timed-out collective raises in the calling thread and aborts the communicator, instead of
    # the watchdog tearing the whole process (the learner!) down; read when the group is created
    os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    opts = dist.ProcessGroupNCCL.Options()
    opts._timeout = timeout
    opts.group_name = name  # names the group in NCCL logs and flight-recorder dumps
    group = dist.ProcessGroupNCCL(store, rank, world_size, opts)
    index = torch.cuda.current_device() if device.index is None else device.index
    try:
        group.eager_connect_single_device(torch.device("cuda", index))
    except BaseException:
        group.abort()
        raise
    return group


class BroadcastSource:
    """Rank 0 of the weight-sync group: the learner's side, held by the learner
    (composition). Sends the ``publisher``'s wire buffers from ``device``."""

    def __init__(self, publisher: WeightPublisher, device: torch.device):
        self.publisher, self.device = publisher, device
        self.rank = _Rank()
        self.store = None
        self.host: str | None = None

    def device_info(self) -> dict:
        return device_info(self.device, self.publisher.wire_fingerprint)

    def open_store(self, host: str) -> tuple[str, int]:
        """Serve the rendezvous store on ``host`` (once per process; every group uses its own prefix)."""
        if self.store is None:
            self.store = dist.TCPStore(host, 0, None, True, timedelta(seconds=60), wait_for_workers=False)
            self.host = host
        return self.host, self.store.port

    def join(self, spec: GroupSpec, rank: int) -> None:
        if rank != 0:
            raise CollectiveConfigError(f"the learner is rank 0 of the weight-sync group, asked to be rank {rank}")
        self.rank.join(spec, 0, self.device, store=self.store)

    def broadcast(self, epoch: int) -> Payload:
        """Broadcast the current weights (the wire cast); returns the payload to announce (no refs)."""
        rank = self.rank
        with rank.lock:
            rank.check(epoch, "the learner")
            buffers = self.publisher.wire()
            version = self.publisher.version
            try:
                rank.broadcast([buffers[k] for k in sorted(buffers)], version, self.device)
            except Exception:
                rank.leave_locked()  # a failed collective leaves the group unusable
                raise
        return Payload(version, self.publisher.wire_fingerprint, refs={})


class StagedReceiver:
    """Rollout side: joins groups, receives broadcasts into a staging copy of the
    flat buffers, and applies a staged version between generate calls."""

    def __init__(self, flat: FlatParams, name: str = "rollout"):
        self.flat = flat
        self.name = name
        self.rank = _Rank()
        self.staging: dict[str, torch.Tensor] | None = None
        self.staged_version: int | None = None
        self.failed = False  # the last broadcast to this worker failed: its version comes by the object store
        self.lock = threading.Lock()  # staging: written by a broadcast, read by apply
        self.device = next(iter(flat.buffers.values())).device

    def device_info(self) -> dict:
        return device_info(self.device, self.flat.fingerprint)

    def join(self, spec: GroupSpec, rank: int) -> None:
        if spec.fingerprint != self.flat.fingerprint:
            raise CollectiveConfigError(
                f"{self.name}: weight layout {self.flat.fingerprint} differs from the learner's {spec.fingerprint} "
                f"(different architectures or dtypes: rollout.dtype must match what the learner publishes; with "
                f"model.lora, different base weights)")
        if self.staging is None:
            self.staging = {k: torch.empty_like(b) for k, b in self.flat.buffers.items()}
        self.rank.join(spec, rank, self.device)

    def receive(self, epoch: int) -> int:
        """Take part in the broadcast of ``epoch``'s group; returns the version staged."""
        with self.rank.lock:
            self.rank.check(epoch, self.name)
            with self.lock:
                self.staged_version = None  # the staging copy is about to change
                try:
                    version = self.rank.broadcast([self.staging[k] for k in sorted(self.staging)], None, self.device)
                except Exception:
                    self.failed = True
                    self.rank.leave_locked()
                    raise
                self.staged_version, self.failed = version, False
        return version

    def apply(self, receiver: WeightReceiver, version: int, *, force: bool = False) -> bool | None:
        """Apply the staged weights if they are of ``version`` or newer: True if applied,
        False if we already hold them, None if nothing suitable is staged."""
        with self.lock:
            staged = self.staged_version
            if staged is None or staged < version:
                return None
            if staged < receiver.version or (staged == receiver.version and not force):
                return False
            with torch.no_grad():
                for k, src in self.staging.items():
                    self.flat.buffers[k].copy_(src)
            receiver.version = staged
            return True


def choose_backend(requested: str, infos: dict[str, dict]) -> str:
    """``nccl`` or ``gloo`` for ranks described by ``device_info`` (name -> info)."""
    on_cpu = [n for n, i in infos.items() if i["device"] != "cuda"]
    by_gpu: dict[str, list[str]] = {}
    for n, i in infos.items():
        if i["gpu"] is not None:
            by_gpu.setdefault(i["gpu"], []).append(n)
    shared = [names for names in by_gpu.values() if len(names) > 1]
    if requested == "gloo":
        return "gloo"
    if requested == "nccl":
        if on_cpu:
            raise CollectiveConfigError(f"train.weight_sync_backend: nccl needs every rank on CUDA; on CPU: "
                                        f"{', '.join(on_cpu)}")
        if shared:
            raise CollectiveConfigError(
                f"train.weight_sync_backend: nccl cannot put two ranks on one GPU (NCCL: 'Duplicate GPU "
                f"detected'); sharing a GPU: {'; '.join(', '.join(s) for s in shared)}. Give each its own GPU "
                f"(num_gpus: 1) or use weight_sync_backend: gloo (or auto)")
        if not dist.is_nccl_available():
            raise CollectiveConfigError("train.weight_sync_backend: nccl, but this torch build has no NCCL")
        return "nccl"
    return "nccl" if not on_cpu and not shared and dist.is_nccl_available() else "gloo"
