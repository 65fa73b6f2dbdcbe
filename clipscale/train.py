"""The training loop: fetch -> step -> maybe checkpoint -> log, over a global batch.

    python -m clipscale train recipes/tiny_cpu.toml                        # one process
    torchrun --nproc_per_node=2 -m clipscale train recipes/tiny_cpu.toml   # DDP/FSDP2, gloo or NCCL
    clipscale train RECIPE train.global_batch_size=512 run.name=b512       # dotted overrides

The run directory `RUN_DIR = run.output_dir/run.name` holds config.json, metrics.jsonl and
checkpoints/; starting a run whose directory has a complete checkpoint resumes from it.
SIGUSR1 or SIGTERM: the current step finishes, a checkpoint is saved and every rank exits with
`EXIT_PREEMPTED`, so a scheduler can requeue the job and the next start resumes.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import resource
import signal
import time
from pathlib import Path

import torch

from clipscale import checkpoint as ckpt
from clipscale.config import Config, config_to_dict, save_config
from clipscale.data.pipeline import build_train_loader, merge_rank_states, normalize_images, sum_counters
from clipscale.dist import (STOP_SIGNALS, DistInfo, all_reduce_mean, destroy_distributed, init_distributed,
                            stop_when_launcher_dies)
from clipscale.gradcache import gradcache_step
from clipscale.loss import contrastive_loss
from clipscale.metrics import MetricsLogger, StepTimer, mfu, peak_flops
from clipscale.models import ModelBundle, build_model, count_params, gmacs_per_sample
from clipscale.optim import build_optimizer, lr_at, set_lr
from clipscale.parallel import autocast, full_tensor, global_grad_norm, grad_scaler, parallelize, unwrap

log = logging.getLogger(__name__)
MAX_LOGIT_SCALE = math.log(100)  # temperature floor of 0.01 (Radford et al. 2021)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved on a signal, resume by starting again
PREEMPTED_MARKER = "preempted"  # file in the run directory: the last launch saved and exited on a signal


class Preempted(SystemExit):
    def __init__(self) -> None:
        super().__init__(EXIT_PREEMPTED)


class NonFiniteLoss(RuntimeError):
    pass


@dataclasses.dataclass
class Progress:
    step: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0


@dataclasses.dataclass
class StepResult:
    loss: torch.Tensor
    grad_norm: torch.Tensor
    skipped: bool  # loss or gradients were non-finite on some rank: no update
    stop: bool  # some rank received a stop signal


class StopSignal:
    """Remembers SIGUSR1/SIGTERM; the loop acts on it at a step boundary, agreed across ranks.

    Under torchrun a dying agent also sends this rank SIGTERM (`stop_when_launcher_dies`), and the
    DataLoader workers ignore these signals (`ignore_stop_signals`), so whichever process a
    scheduler signals first, every rank saves and exits with `EXIT_PREEMPTED`.
    """

    def __init__(self) -> None:
        self.requested = False
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        stop_when_launcher_dies()

    def _handle(self, signum, frame) -> None:
        log.warning("received %s: stopping after this step", signal.Signals(signum).name)
        self.requested = True


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
    stop_signal = StopSignal()
    torch.manual_seed(cfg.run.seed)  # identical initialisation on every rank
    bundle = build_model(cfg.model, device=info.device)
    model = parallelize(bundle.model, cfg.train, info)
    optimizer = build_optimizer(model, cfg.optim)
    scaler = grad_scaler(cfg.train, info.device)
    loader = build_train_loader(
        cfg.data, tokenizer=bundle.tokenizer, image_size=bundle.image_size,
        batch_size=cfg.train.global_batch_size // info.world_size, rank=info.rank,
        world_size=info.world_size, seed=cfg.run.seed,
    )
    progress = resume(run_dir / "checkpoints", model=model, optimizer=optimizer, loader=loader, scaler=scaler)
    torch.manual_seed(cfg.run.seed * 1000 + info.rank + progress.step)  # per-rank stochastic layers
    total_steps = cfg.train.total_samples // cfg.train.global_batch_size
    metrics = MetricsLogger(run_dir, cfg.log, enabled=info.is_main, total_steps=total_steps,
                            config=config_to_dict(cfg), start_step=progress.step)
    gmacs = gmacs_per_sample(bundle)
    if progress.step == 0:
        metrics.log({"step": 0, "params": count_params(unwrap(model)), "gmacs_per_sample": gmacs,
                     "world_size": info.world_size})
    start, t0 = progress.samples_seen, time.perf_counter()
    try:
        run_loop(cfg, info, model=model, optimizer=optimizer, loader=loader, bundle=bundle, scaler=scaler,
                 progress=progress, total_steps=total_steps, metrics=metrics, stop_signal=stop_signal,
                 flops_per_sample=3 * 2e9 * gmacs)
    finally:
        metrics.close()
    log.info("done: run=%s steps=%d samples_seen=%d skipped_steps=%d samples_per_s=%.1f minutes=%.2f",
             cfg.run.name, progress.step, progress.samples_seen, progress.skipped_steps,
             (progress.samples_seen - start) / (time.perf_counter() - t0), (time.perf_counter() - t0) / 60)
    return run_dir


def run_loop(cfg: Config, info: DistInfo, *, model, optimizer, loader, bundle: ModelBundle,
             progress: Progress, total_steps: int, metrics: MetricsLogger, stop_signal: StopSignal,
             flops_per_sample: float, scaler: torch.amp.GradScaler | None = None) -> None:
    batches = iter(loader)
    timer = StepTimer(info.device)
    peak = peak_flops(torch.cuda.get_device_name(info.device)) if info.device.type == "cuda" else None
    global_batch, t = cfg.train.global_batch_size, cfg.train
    nonfinite_streak = 0
    t_log, samples_at_log = time.perf_counter(), progress.samples_seen
    while progress.step < total_steps:
        timer.sync = (progress.step + 1) % t.log_every_steps == 0  # exact phase times on log steps
        batch = next(batches)  # fetch
        images = normalize_images(batch.images_on(info.device), mean=bundle.mean, std=bundle.std)
        texts = batch.texts.to(info.device, non_blocking=True)
        timer.lap("data_s")
        lr = lr_at(progress.samples_seen + global_batch, cfg=cfg.optim, total_samples=t.total_samples)
        set_lr(optimizer, lr)
        result = train_step(model, images, texts, optimizer=optimizer, cfg=cfg, device=info.device,
                            timer=timer, stop_requested=stop_signal.requested, scaler=scaler)
        progress.step += 1
        progress.samples_seen += global_batch
        metrics.advance()
        nonfinite_streak = nonfinite_streak + 1 if result.skipped else 0
        progress.skipped_steps += result.skipped
        if nonfinite_streak >= t.max_nonfinite_steps:
            save(cfg, model=model, optimizer=optimizer, loader=loader, progress=progress, scaler=scaler)
            raise NonFiniteLoss(
                f"{nonfinite_streak} consecutive steps with non-finite loss or gradients at step "
                f"{progress.step}; saved the last good weights (updates were skipped). Lower "
                f"optim.lr_peak, set optim.grad_clip_norm, or use train.precision='bf16'")

        last = progress.step == total_steps
        if crossed(progress.samples_seen, global_batch, t.checkpoint_every_samples) or last or result.stop:
            save(cfg, model=model, optimizer=optimizer, loader=loader, progress=progress, scaler=scaler)
        if progress.step % t.log_every_steps == 0 or last:
            elapsed = time.perf_counter() - t_log
            per_device = (progress.samples_seen - samples_at_log) / elapsed / info.world_size
            t_log, samples_at_log = time.perf_counter(), progress.samples_seen
            metrics.log({
                "step": progress.step, "samples_seen": progress.samples_seen,
                "loss": all_reduce_mean(result.loss).item(),  # host sync: once per log interval
                "grad_norm": result.grad_norm.item(), "lr": lr,
                "logit_scale": full_tensor(unwrap(model).logit_scale).exp().item(),
                "samples_per_s": per_device * info.world_size, "samples_per_s_per_device": per_device,
                "mfu": mfu(flops_per_sample=flops_per_sample, samples_per_s_per_device=per_device, peak=peak),
                "skipped_steps": progress.skipped_steps, "max_memory_gb": max_memory_gb(info.device),
                **({"loss_scale": scaler.get_scale()} if scaler is not None and scaler.is_enabled() else {}),
                **timer.pop(), **data_counters(loader),
            })
        if result.stop:
            log.warning("stopped at step %d on a signal; start the run again to resume", progress.step)
            raise Preempted()


def train_step(model: torch.nn.Module, images: torch.Tensor, texts: torch.Tensor, *,
               optimizer: torch.optim.Optimizer, cfg: Config, device: torch.device,
               timer: StepTimer, stop_requested: bool = False,
               scaler: torch.amp.GradScaler | None = None) -> StepResult:
    """One optimizer step on this rank's share of the global batch (B_rank samples).

    With an enabled `scaler` (fp16) the loss is scaled for backward and the gradients unscaled
    before the norm; a step that any rank finds non-finite is skipped and the scale backed off on
    every rank alike. The gradient-cache path does its own backward with the same scale.
    """
    optimizer.zero_grad(set_to_none=True)
    scaling = scaler is not None and scaler.is_enabled()
    if cfg.train.chunk_size:
        with autocast(cfg.train, device):
            loss = gradcache_step(model, images, texts, chunk_size=cfg.train.chunk_size, loss_cfg=cfg.loss,
                                  scale_loss=scaler.scale if scaling else None)
        timer.lap("forward_backward_s")
    else:
        with autocast(cfg.train, device):
            out = model(images, texts)
        loss = contrastive_loss(cfg.loss, out["image_features"].float(), out["text_features"].float(),
                                out["logit_scale"].float(), out.get("logit_bias"))
        timer.lap("forward_s")
        (scaler.scale(loss) if scaling else loss).backward()
        timer.lap("backward_s")
    if scaling:
        scaler.unscale_(optimizer)
    grad_norm = global_grad_norm(model, max_norm=cfg.optim.grad_clip_norm)
    skipped, stop = agree_on_flags(~torch.isfinite(loss.detach()) | ~torch.isfinite(grad_norm), stop_requested)
    if not skipped:
        if scaling:
            scaler.step(optimizer)
        else:
            optimizer.step()
        with torch.no_grad():
            unwrap(model).logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    if scaling:
        update_scale(scaler, skipped=skipped)
    timer.lap("optimizer_s")
    return StepResult(loss=loss.detach(), grad_norm=grad_norm, skipped=skipped, stop=stop)


def agree_on_flags(nonfinite: torch.Tensor, stop_requested: bool) -> tuple[bool, bool]:
    """Whether any rank saw a non-finite value or a stop signal (one all_reduce, one host sync)."""
    flags = torch.stack([nonfinite.float().reshape(()), torch.tensor(float(stop_requested), device=nonfinite.device)])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    skipped, stop = flags.tolist()  # host sync: every step, so every rank takes the same branch
    return bool(skipped), bool(stop)


def update_scale(scaler: torch.amp.GradScaler, *, skipped: bool) -> None:
    """Grow or back off the loss scale from the agreed skip flag, so every rank keeps one scale.

    The scaler's own inf check is per rank; a step skipped because another rank (or the loss)
    was non-finite must still back the scale off here.
    """
    if skipped:
        scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
        scaler.load_state_dict({**scaler.state_dict(), "_growth_tracker": 0})  # growth restarts, as on a local inf
    else:
        scaler.update()


def crossed(samples_seen: int, batch: int, every: int) -> bool:
    """True when the last step crossed a multiple of `every` samples."""
    return every > 0 and samples_seen // every > (samples_seen - batch) // every


def global_loader_state(loader) -> dict:
    """The loader state of the whole job, each stream's entry taken from the rank that owns it."""
    state = loader.state_dict()
    if not torch.distributed.is_initialized():
        return state
    states = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, state)
    return merge_rank_states(states)


def data_counters(loader) -> dict[str, float]:
    """Good and bad sample counts of all ranks' streams, for the metrics (one gather per log step)."""
    streams = global_loader_state(loader)["streams"]
    return {f"data_{k}": v for k, v in sum_counters(st["totals"] for st in streams).items()}


def save(cfg: Config, *, model, optimizer, loader, progress: Progress,
         scaler: torch.amp.GradScaler | None = None) -> None:
    meta = {"samples_seen": progress.samples_seen, "skipped_steps": progress.skipped_steps,
            "loader": global_loader_state(loader), "config": config_to_dict(cfg)}
    if scaler is not None and scaler.is_enabled():
        meta["grad_scaler"] = scaler.state_dict()  # plain floats/ints: resume keeps the exact scale
    ckpt.save_checkpoint(cfg.run_dir / "checkpoints", model=model, optimizer=optimizer, step=progress.step,
                         meta=meta, keep_last=cfg.train.keep_last,
                         keep_every_samples=cfg.train.keep_every_samples)


def resume(ckpt_dir: Path, *, model, optimizer, loader, scaler: torch.amp.GradScaler | None = None) -> Progress:
    latest = ckpt.latest_checkpoint(ckpt_dir)
    if latest is None:
        return Progress()
    meta = ckpt.load_checkpoint(latest, model=model, optimizer=optimizer)
    loader.load_state_dict(meta["loader"])
    if scaler is not None and scaler.is_enabled() and "grad_scaler" in meta:
        scaler.load_state_dict(meta["grad_scaler"])
    log.info("resumed from %s (step %d, %d samples)", latest, meta["step"], meta["samples_seen"])
    return Progress(step=meta["step"], samples_seen=meta["samples_seen"],
                    skipped_steps=meta.get("skipped_steps", 0))


def configure_threads(cfg: Config, info: DistInfo) -> None:
    """Split CPU cores between the processes of this node so ranks do not oversubscribe."""
    if info.device.type != "cpu":
        return
    local_procs = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = cfg.train.num_threads or max(1, (os.cpu_count() or 1) // local_procs)
    torch.set_num_threads(threads)


def max_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB, process peak RSS
