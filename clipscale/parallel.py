"""How the model is distributed: DDP or FSDP2, mixed precision, activation checkpointing, compile.

`model.py`-side code never imports torch.distributed; everything about replication and sharding
is decided here from `TrainConfig`.
"""
from __future__ import annotations

import contextlib
import logging
import math

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.tensor import DTensor
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from clipscale.config import TrainConfig
from clipscale.dist import DistInfo

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def has_blocks(tower: torch.nn.Module | None) -> bool:
    return hasattr(getattr(tower, "transformer", None), "resblocks")


def block_lists(model: torch.nn.Module) -> list[torch.nn.ModuleList]:
    """The residual-block lists of an open_clip model's towers: `visual`, and the text transformer
    (the model itself for CLIP, `text` for CustomTextCLIP); a timm or HF tower has none."""
    towers = (getattr(model, "visual", None), model, getattr(model, "text", None))
    return [t.transformer.resblocks for t in towers if has_blocks(t)]


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Residual blocks of both towers: the FSDP2 sharding units (and the activation-checkpointing units)."""
    return [block for blocks in block_lists(model) for block in blocks]


def checkpoint_blocks(model: torch.nn.Module) -> None:
    """Recompute every transformer block in backward (a timm image tower checkpoints its own blocks).

    The checkpoint wraps each block inside its FSDP2 unit, as torchtitan applies it: FSDP2 casts a
    unit's inputs to the compute dtype in forward but not when backward recomputes the unit, so a
    checkpoint around the unit (open_clip's `set_grad_checkpointing`) recomputes bf16 weights on the
    saved fp32 input, which CUDA's layer norm refuses (CPU's mixed-dtype kernels hide it).
    """
    for blocks in block_lists(model):
        for i, block in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(block)  # state-dict keys stay the block's own
    for tower in (getattr(model, "visual", None), getattr(model, "text", None)):
        if tower is not None and not has_blocks(tower):
            tower.set_grad_checkpointing(True)


def parallelize(model: torch.nn.Module, cfg: TrainConfig, info: DistInfo) -> torch.nn.Module:
    """Apply activation checkpointing, then FSDP2 or DDP, then torch.compile, in that order.

    Order matters: checkpointing wraps block forwards before sharding hooks are installed, and
    compile sees the final module so it traces the communication hooks too.
    """
    if info.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores (H100/A100)
        torch.backends.cudnn.allow_tf32 = True
    if cfg.grad_checkpointing:
        checkpoint_blocks(model)
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
