"""How the model is distributed: DDP or FSDP2, mixed precision, activation checkpointing, compile.

`model.py`-side code never imports torch.distributed; everything about replication and sharding
is decided here from `TrainConfig`.
"""
from __future__ import annotations

import contextlib
import logging
import math

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from clipscale.config import TrainConfig
from clipscale.dist import DistInfo

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Residual blocks of both towers of an open_clip CLIP model: the FSDP2 sharding units."""
    blocks = []
    for tower in (getattr(model, "visual", None), model):
        transformer = getattr(tower, "transformer", None)
        if transformer is not None and hasattr(transformer, "resblocks"):
            blocks.extend(transformer.resblocks)
    return blocks


def parallelize(model: torch.nn.Module, cfg: TrainConfig, info: DistInfo) -> torch.nn.Module:
    """Apply activation checkpointing, then FSDP2 or DDP, then torch.compile, in that order.

    Order matters: checkpointing wraps block forwards before sharding hooks are installed, and
    compile sees the final module so it traces the communication hooks too.
    """
    if info.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores (H100/A100)
        torch.backends.cudnn.allow_tf32 = True
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    if cfg.parallel == "fsdp":
        model = shard_fsdp(model, precision=cfg.precision, reshard_after_forward=cfg.fsdp_reshard_after_forward)
    elif info.world_size > 1:
        device_ids = [info.device.index] if info.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=device_ids)
    if cfg.compile:
        model = torch.compile(model, backend=cfg.compile_backend)
    return model


def grad_scaler(cfg: TrainConfig, device: torch.device) -> torch.amp.GradScaler:
    """Dynamic loss scaling for fp16 autocast; a disabled (pass-through) scaler otherwise."""
    return torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")


def shard_fsdp(model: torch.nn.Module, *, precision: str, reshard_after_forward: bool) -> torch.nn.Module:
    """fully_shard each transformer block of both towers, then the root (embeddings, heads).

    Parameters stay fp32 (the optimizer's master copy); compute runs in `precision` and gradients
    are reduced in fp32.
    """
    policy = MixedPrecisionPolicy(param_dtype=DTYPES[precision], reduce_dtype=torch.float32)
    for block in transformer_blocks(model):
        fully_shard(block, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to `precision` ("bf16", "fp16") on `device`; "fp32" runs as it is. The one autocast of
    training (`step_precision`) and evaluation."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def step_precision(cfg: TrainConfig) -> str:
    """What a training step autocasts to: DDP / one process autocast; FSDP2 handles dtypes through its policy."""
    return "fp32" if cfg.parallel == "fsdp" else cfg.precision


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The open_clip model under DDP / compile wrappers (FSDP2 modifies in place)."""
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, DistributedDataParallel) else model


def global_grad_norm(model: torch.nn.Module, *, max_norm: float | None) -> torch.Tensor:
    """L2 norm of all gradients across ranks (and shards), clipping to `max_norm` when given.

    With FSDP2 the gradients are DTensors; the norm is reduced over the mesh and returned as a
    plain tensor so every rank sees the same value.
    """
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm is not None else math.inf)
    return full_tensor(norm)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor with the whole value (gathers a sharded DTensor; collective under FSDP2)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
