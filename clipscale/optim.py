"""AdamW with CLIP's parameter groups and learning-rate schedules defined in samples seen.

Schedules are functions of samples, not steps, so changing the number of GPUs (and hence the
per-rank batch) or the global batch leaves the schedule's shape over data unchanged.
"""
from __future__ import annotations

import math

import torch

from clipscale.config import OptimConfig


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Gains, biases, the logit scale/bias and embeddings are not decayed (Radford et al. 2021)."""
    return param.ndim < 2 or "embedding" in name or "logit_" in name


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if no_weight_decay(name, param) else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # fused: one kernel per device, and it honours `found_inf` (see step_unless)
    return torch.optim.AdamW(groups, lr=cfg.lr_peak, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)


def step_unless(optimizer: torch.optim.AdamW, skip: torch.Tensor) -> None:
    """`optimizer.step()`, except where `skip` (a 0-d bool tensor on the device) is true: then
    parameters, moments and step counts stay exactly as they were.

    No host sync: the fused AdamW kernel reads the flag on the device through the optimizer's
    `found_inf` attribute (the one `torch.amp.GradScaler` sets); it works on CPU and CUDA, and on
    FSDP2's DTensor parameters.
    """
    optimizer.found_inf = skip.float()
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


def lr_at(samples_seen: int, *, cfg: OptimConfig, total_samples: int) -> float:
    """Learning rate for the step that brings the run to `samples_seen` samples.

    Linear warmup to lr_peak over warmup_samples, then cosine decay to lr_min over the rest
    (Loshchilov & Hutter 2017), or constant followed by a linear cooldown of cooldown_samples.
    """
    lr_min = cfg.lr_peak * cfg.lr_min_ratio
    if samples_seen < cfg.warmup_samples:
        return cfg.lr_peak * samples_seen / cfg.warmup_samples
    if cfg.schedule == "cosine":
        span = max(total_samples - cfg.warmup_samples, 1)
        progress = min((samples_seen - cfg.warmup_samples) / span, 1.0)
        return lr_min + 0.5 * (cfg.lr_peak - lr_min) * (1 + math.cos(math.pi * progress))
    cooldown_start = total_samples - cfg.cooldown_samples
    if samples_seen <= cooldown_start:
        return cfg.lr_peak
    progress = min((samples_seen - cooldown_start) / max(cfg.cooldown_samples, 1), 1.0)
    return cfg.lr_peak + (lr_min - cfg.lr_peak) * progress


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def crossed(samples_seen: int, batch: int, every: int) -> bool:
    """True when the last step (of `batch` samples) crossed a multiple of `every` samples (0: never)."""
    return every > 0 and samples_seen // every > (samples_seen - batch) // every
