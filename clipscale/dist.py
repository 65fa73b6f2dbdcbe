"""Process-group setup, launcher signals and the collectives used by the rest of clipscale.

All torch.distributed calls live here (and in parallel.py for model wrapping), so model, loss and
data code stay free of process-group logic. Launchers set the environment:

    torchrun --nproc_per_node=2 -m clipscale train recipes/tiny_cpu.toml
    srun torchrun ...                         (SLURM, one task per node; see slurm/)
    srun python -m clipscale train ...        (SLURM, one task per GPU: SLURM_PROCID, ... are read)

and plain `python -m clipscale train` runs as world size 1 without a process group.
"""
from __future__ import annotations

import ctypes
import dataclasses
import datetime
import logging
import os
import signal
from typing import Any, Callable

import torch
import torch.distributed as dist

from clipscale.launch import launch_env

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)  # schedulers, torchrun, Ctrl-C
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_LAUNCHER_PID = os.getppid()  # at import, early in the rank's life: torchrun's agent under torchrun


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, world size, rank on this node, device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(*, device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Start the default process group when launched with several ranks (see `launch_env`).

    `device="auto"` picks CUDA (NCCL) when available, else CPU (gloo). A collective that waits
    longer than `timeout_s` for another rank fails, so a rank whose peer is gone exits.
    """
    launch = launch_env()
    rank, world_size, local_rank = launch.rank, launch.world_size, launch.local_rank
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend, init_method=launch.init_method, rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
        log.info("process group up: backend=%s rank=%d world_size=%d", backend, rank, world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


class StopSignal:
    """Remembers the first stop signal (SIGUSR1, SIGTERM, SIGINT); the training loop acts on it at
    its next sync point, where the ranks agree, and logs it there: the handler only records it, as
    logging from a signal handler can re-enter a half-done write to the same stream.

    Once Ctrl-C (SIGINT) has asked for a stop, a second SIGINT, or the SIGTERM torchrun sends on a
    second Ctrl-C, ends the process at once, without saving. Under torchrun a dying agent also sends
    this rank SIGTERM (`stop_when_launcher_dies`), and the DataLoader workers ignore these signals
    (`init_loader_worker`), so whichever process a scheduler signals first, every rank saves.
    """

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        stop_when_launcher_dies()

    def _handle(self, signum: int, frame) -> None:
        if self.received == signal.SIGINT and signum in (signal.SIGINT, signal.SIGTERM):
            _die_of(signal.Signals(signum))
        if self.received is None:
            self.received = signal.Signals(signum)


def _die_of(sig: signal.Signals) -> None:
    """End this process by `sig`'s default action (no traceback, no exit handlers); its DataLoader
    workers follow it (`init_loader_worker`)."""
    os.write(2, f"clipscale: {sig.name} again: stopping at once, without saving\n".encode())
    signal.signal(sig, signal.SIG_DFL)
    os.kill(os.getpid(), sig)


def init_loader_worker(worker_id: int = 0, *, parent_pid: int) -> None:
    """DataLoader `worker_init_fn` (bind `parent_pid=os.getpid()` of the training process).

    Only the training process acts on a stop signal: torchrun forwards signals to each rank's whole
    process group, which includes its workers, and a worker dying of SIGTERM would crash the rank
    before it can save; SIGINT too, so that Ctrl-C stops training through the rank. A worker holds
    nothing worth saving, so it dies with its rank, however the rank ends (even SIGKILL), instead
    of waiting for an exit handler's join that never comes.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    _signal_on_parent_death(signal.SIGKILL, parent_pid=parent_pid)


def stop_when_launcher_dies() -> None:
    """Under torchrun, have the kernel send SIGTERM to this rank if its agent process dies.

    torchrun starts ranks in sessions of their own, so an agent killed by a signal it does not
    handle (SIGUSR1 by default, SIGKILL) would leave them running unsupervised; with this they
    save and exit like on any other stop signal. Linux only; elsewhere a no-op.
    """
    if "TORCHELASTIC_RUN_ID" in os.environ:
        _signal_on_parent_death(signal.SIGTERM, parent_pid=_LAUNCHER_PID)


def _signal_on_parent_death(sig: signal.Signals, *, parent_pid: int) -> None:
    """prctl(PR_SET_PDEATHSIG): the kernel sends this process `sig` when its parent dies (Linux only)."""
    if os.uname().sysname != "Linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d): this process will outlive its parent",
                    ctypes.get_errno())
    elif os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.kill(os.getpid(), sig)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def new_cpu_group(*, timeout_s: float) -> dist.ProcessGroup | None:
    """A gloo group of all ranks for collectives run off the main thread (None without a process group);
    give it the default group's timeout, or a lost peer holds the thread for torch's default 30 min."""
    if not dist.is_initialized():
        return None
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for our slice.

    Implemented with all_reduce (supported by gloo and NCCL alike) rather than reduce_scatter,
    so the same code path is exercised by CPU tests and GPU runs.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.world = dist.get_rank(), dist.get_world_size()
        parts = [torch.empty_like(tensor) for _ in range(ctx.world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss depends on our rows: sum their gradients
        return grad.chunk(ctx.world, dim=0)[ctx.rank]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` (B_local, ...) from all ranks along dim 0 -> (B_global, ...).

    Gradients flow back to each rank's own slice. Requires equal B_local on every rank.
    Identity when no process group is running.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    return _GatherWithGrad.apply(tensor)


def gather_rows(values: torch.Tensor) -> torch.Tensor:
    """Every rank's `values` (N,) stacked -> (world_size, N), in one all_gather.

    One collective for several statistics that need different reductions (mean, max, any):
    each rank reduces the rows itself. Shape (1, N) without a process group.
    """
    values = values.detach().reshape(-1)
    if not dist.is_initialized():
        return values[None]
    rows = [torch.empty_like(values) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, values)
    return torch.stack(rows)


def gather_objects(obj: object) -> list:
    """Every rank's picklable `obj`, in rank order, on every rank (`[obj]` without a process group)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def rank0_value(compute: Callable[[], Any]) -> Any:
    """What `compute()` returns on rank 0, on every rank (collective): rank 0 alone does file work that
    must be done once or be seen alike (listing shards, reading a table that may change). What it
    raises is raised on every rank, so no rank waits for a broadcast that never comes."""
    if not dist.is_initialized():
        return compute()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box = [(compute(), None)]
        except Exception as e:  # noqa: BLE001 - handed to every rank, then raised
            box = [(None, e)]
    dist.broadcast_object_list(box, src=0)
    value, error = box[0]
    if error is not None:
        raise error
    return value


def main_does(work: Callable[[], None], *, what: str) -> None:
    """Collective: rank 0 runs `work`, and every rank raises if it failed.

    Rank-0-only file work between barriers (renames, deletions, small files) would otherwise leave
    the other ranks waiting in the next collective until the process-group timeout.
    """
    each_does(work if rank() == 0 else lambda: None, what=what)


def each_does(work: Callable[[], None], *, what: str) -> None:
    """Collective: every rank runs `work`; if it failed anywhere, every rank raises.

    A rank that failed re-raises its own exception; the others raise `PeerRankError` naming the
    first rank that failed and its error.
    """
    error, failure = None, None
    try:
        work()
    except Exception as e:  # reported to every rank below, then re-raised here
        error, failure = e, f"{type(e).__name__}: {e}"
    failures = gather_objects(failure)
    if error is not None:
        raise error
    for r, f in enumerate(failures):
        if f is not None:
            raise PeerRankError(f"rank {r} failed {what}: {f}")


class PeerRankError(RuntimeError):
    """Raised on the other ranks when one rank's part of a collective step failed."""
