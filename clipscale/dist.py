"""Process-group setup and the collectives used by the rest of clipscale.

All torch.distributed calls live here (and in parallel.py for model wrapping), so model, loss and
data code stay free of process-group logic. Launchers set the environment:

    torchrun --nproc_per_node=2 -m clipscale train recipes/tiny_cpu.toml
    srun torchrun ... (SLURM; see slurm/)

and plain `python -m clipscale train` runs as world size 1 without a process group.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


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
    """Start the default process group when launched by torchrun (WORLD_SIZE > 1).

    `device="auto"` picks CUDA (NCCL) when available, else CPU (gloo).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
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
            backend=backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
        log.info("process group up: backend=%s rank=%d world_size=%d", backend, rank, world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


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
