"""The training loop: fetch -> step -> maybe checkpoint -> log, over a global batch.

    python -m clipscale train recipes/tiny_cpu.toml                        # one process
    torchrun --nproc_per_node=2 -m clipscale train recipes/tiny_cpu.toml   # DDP on gloo/NCCL
    clipscale train RECIPE train.global_batch_size=512 run.name=b512       # dotted overrides

The run directory `RUN_DIR = run.output_dir/run.name` holds config.json, metrics.jsonl and
checkpoints/; starting a run whose directory has a complete checkpoint resumes from it.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from pathlib import Path

import torch

from clipscale import checkpoint as ckpt
from clipscale.config import Config, config_to_dict, save_config
from clipscale.data.pipeline import build_train_loader, normalize_images
from clipscale.dist import DistInfo, all_reduce_mean, destroy_distributed, init_distributed
from clipscale.gradcache import gradcache_step
from clipscale.loss import contrastive_loss
from clipscale.metrics import MetricsLogger, StepTimer
from clipscale.models import ModelBundle, build_model, count_params, gmacs_per_sample
from clipscale.optim import build_optimizer, lr_at, set_lr
from clipscale.parallel import autocast, parallelize, unwrap

log = logging.getLogger(__name__)
MAX_LOGIT_SCALE = math.log(100)  # temperature floor of 0.01 (Radford et al. 2021)


@dataclasses.dataclass
class Progress:
    step: int = 0
    samples_seen: int = 0


def train(cfg: Config) -> Path:
    """Train according to `cfg`; returns the run directory. Collective under torchrun."""
    info = init_distributed(device=cfg.run.device)
    try:
        return _train(cfg, info)
    finally:
        destroy_distributed()


def _train(cfg: Config, info: DistInfo) -> Path:
    run_dir = cfg.run_dir
    if info.is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.json")
    configure_threads(cfg, info)
    torch.manual_seed(cfg.run.seed)  # identical initialisation on every rank
    bundle = build_model(cfg.model, device=info.device)
    model = parallelize(bundle.model, cfg.train, info)
    optimizer = build_optimizer(model, cfg.optim)
    batch_per_rank = cfg.train.global_batch_size // info.world_size
    loader = build_train_loader(
        cfg.data, tokenizer=bundle.tokenizer, image_size=bundle.image_size,
        batch_size=batch_per_rank, rank=info.rank, world_size=info.world_size, seed=cfg.run.seed,
    )
    progress = resume(run_dir / "checkpoints", model=model, optimizer=optimizer, loader=loader)
    torch.manual_seed(cfg.run.seed * 1000 + info.rank + progress.step)  # per-rank stochastic layers
    total_steps = cfg.train.total_samples // cfg.train.global_batch_size
    metrics = MetricsLogger(run_dir, cfg.log, enabled=info.is_main, total_steps=total_steps,
                            config=config_to_dict(cfg), start_step=progress.step)
    if progress.step == 0:
        metrics.log({"step": 0, "params": count_params(unwrap(model)),
                     "gmacs_per_sample": gmacs_per_sample(bundle), "world_size": info.world_size})
    try:
        run_loop(cfg, info, model=model, optimizer=optimizer, loader=loader, bundle=bundle,
                 progress=progress, total_steps=total_steps, metrics=metrics)
    finally:
        metrics.close()
    return run_dir


def run_loop(cfg: Config, info: DistInfo, *, model, optimizer, loader, bundle: ModelBundle,
             progress: Progress, total_steps: int, metrics: MetricsLogger) -> None:
    batches = iter(loader)
    timer = StepTimer()
    t_log, samples_at_log = time.perf_counter(), progress.samples_seen
    global_batch = cfg.train.global_batch_size
    while progress.step < total_steps:
        batch = next(batches)  # fetch
        images = normalize_images(batch.images.to(info.device, non_blocking=True), mean=bundle.mean, std=bundle.std)
        texts = batch.texts.to(info.device, non_blocking=True)
        timer.lap("data_s")
        lr = lr_at(progress.samples_seen + global_batch, cfg=cfg.optim, total_samples=cfg.train.total_samples)
        set_lr(optimizer, lr)
        loss = train_step(model, images, texts, optimizer=optimizer, cfg=cfg, device=info.device)
        timer.lap("step_s")
        progress.step += 1
        progress.samples_seen += global_batch
        metrics.advance()

        if crossed(progress.samples_seen, global_batch, cfg.train.checkpoint_every_samples) or progress.step == total_steps:
            save(cfg, model=model, optimizer=optimizer, loader=loader, progress=progress)
        if progress.step % cfg.train.log_every_steps == 0 or progress.step == total_steps:
            elapsed = time.perf_counter() - t_log
            samples_per_s = (progress.samples_seen - samples_at_log) / elapsed
            t_log, samples_at_log = time.perf_counter(), progress.samples_seen
            metrics.log({
                "step": progress.step, "samples_seen": progress.samples_seen,
                "loss": all_reduce_mean(loss).item(),  # host sync: once per log interval
                "lr": lr, "logit_scale": unwrap(model).logit_scale.exp().item(),
                "samples_per_s": samples_per_s, "samples_per_s_per_device": samples_per_s / info.world_size,
                **timer.pop(), **{f"data_{k}": v for k, v in loader.counters().items()},
            })


def train_step(model: torch.nn.Module, images: torch.Tensor, texts: torch.Tensor, *,
               optimizer: torch.optim.Optimizer, cfg: Config, device: torch.device) -> torch.Tensor:
    """One optimizer step on this rank's share of the global batch; returns the detached loss."""
    optimizer.zero_grad(set_to_none=True)
    if cfg.train.chunk_size:
        with autocast(cfg.train, device):
            loss = gradcache_step(model, images, texts, chunk_size=cfg.train.chunk_size, loss_cfg=cfg.loss)
    else:
        with autocast(cfg.train, device):
            out = model(images, texts)
        loss = contrastive_loss(cfg.loss, out["image_features"].float(), out["text_features"].float(),
                                out["logit_scale"].float(), out.get("logit_bias"))
        loss.backward()
    if cfg.optim.grad_clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip_norm)
    optimizer.step()
    with torch.no_grad():
        unwrap(model).logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    return loss.detach()


def crossed(samples_seen: int, batch: int, every: int) -> bool:
    """True when the last step crossed a multiple of `every` samples."""
    return every > 0 and samples_seen // every > (samples_seen - batch) // every


def save(cfg: Config, *, model, optimizer, loader, progress: Progress) -> None:
    meta = {"samples_seen": progress.samples_seen, "loader": loader.state_dict(), "config": config_to_dict(cfg)}
    ckpt.save_checkpoint(cfg.run_dir / "checkpoints", model=model, optimizer=optimizer, step=progress.step,
                         meta=meta, keep_last=cfg.train.keep_last)


def resume(ckpt_dir: Path, *, model, optimizer, loader) -> Progress:
    latest = ckpt.latest_checkpoint(ckpt_dir)
    if latest is None:
        return Progress()
    meta = ckpt.load_checkpoint(latest, model=model, optimizer=optimizer)
    loader.load_state_dict(meta["loader"])
    log.info("resumed from %s (step %d, %d samples)", latest, meta["step"], meta["samples_seen"])
    return Progress(step=meta["step"], samples_seen=meta["samples_seen"])


def configure_threads(cfg: Config, info: DistInfo) -> None:
    """Split CPU cores between the processes of this node so ranks do not oversubscribe."""
    if info.device.type != "cpu":
        return
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = cfg.train.num_threads or max(1, (os.cpu_count() or 1) // local_procs)
    torch.set_num_threads(threads)
