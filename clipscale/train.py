"""The training loop: fetch -> step -> maybe evaluate -> maybe checkpoint -> log, over a global batch.

    python -m clipscale train recipes/tiny_cpu.toml                        # one process
    torchrun --nproc_per_node=2 -m clipscale train recipes/tiny_cpu.toml   # DDP/FSDP2, gloo or NCCL
    clipscale train RECIPE train.global_batch_size=512 run.name=b512       # dotted overrides

The run directory `RUN_DIR = run.output_dir/run.name` holds config.json, metrics.jsonl and
checkpoints/ (and training.json while training: `clipscale.run_state`); starting a run whose
directory has a complete checkpoint resumes from it.
SIGUSR1 or SIGTERM: at the next log or checkpoint step (so within `train.log_every_steps` steps)
a checkpoint is saved, the `preempted` marker written and every rank exits with `EXIT_PREEMPTED`,
so a scheduler can requeue the job and the next start resumes. Steps in between run without a
host-device sync.
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
from clipscale.compute import gmacs_per_sample, model_flops_per_sample
from clipscale.config import Config, check_resume_config, config_to_dict, record_config
from clipscale.data.pipeline import build_train_loader, merge_rank_states, normalize_images, sum_counters
from clipscale.dist import (STOP_SIGNALS, DistInfo, destroy_distributed, gather_objects, gather_rows,
                            init_distributed, stop_when_launcher_dies)
from clipscale.evaluate.runner import maybe_eval
from clipscale.gradcache import gradcache_step
from clipscale.loss import contrastive_loss
from clipscale.metrics import MetricsLogger, StepTimer, mfu, peak_flops
from clipscale.models import ModelBundle, build_model, count_params
from clipscale.optim import build_optimizer, crossed, lr_at, set_lr, step_unless
from clipscale.parallel import (autocast, full_tensor, global_grad_norm, grad_scaler, parallelize, step_precision,
                                unwrap)
from clipscale.run_state import PREEMPTED, training_marker

log = logging.getLogger(__name__)
MAX_LOGIT_SCALE = math.log(100)  # temperature floor of 0.01 (Radford et al. 2021)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved on a signal, resume by starting again
PREEMPTED_MARKER = PREEMPTED  # file in the run directory: the last launch saved and exited on a signal


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
    """One step's outcome, left on the device so the step needs no host sync."""

    loss: torch.Tensor  # this rank's loss, 0-d
    grad_norm: torch.Tensor  # global gradient norm, 0-d, the same on every rank
    skipped: torch.Tensor  # 0-d bool: the gradients were non-finite and nothing was updated


class SkipTally:
    """Skipped steps counted on the device between sync points (log and checkpoint steps)."""

    def __init__(self, device: torch.device) -> None:
        self.skipped = torch.zeros((), device=device)  # skipped steps since the last sync point
        self.streak = torch.zeros((), device=device)  # consecutive skipped steps up to now
        self.max_streak = torch.zeros((), device=device)  # longest streak since the last sync point

    def add(self, skipped: torch.Tensor) -> None:
        s = skipped.float()
        self.skipped += s
        self.streak.mul_(s).add_(s)  # streak + 1 on a skipped step, 0 otherwise
        torch.maximum(self.max_streak, self.streak, out=self.max_streak)

    def reset(self) -> None:
        self.skipped.zero_()
        self.max_streak.copy_(self.streak)  # a streak runs on across sync points


@dataclasses.dataclass(frozen=True)
class StepStats:
    """What all ranks agree on at a sync point (`gather_step_stats`)."""

    loss: float  # last step's loss, mean over ranks
    grad_norm: float
    skipped: int  # steps skipped since the previous sync point
    max_streak: int  # longest run of consecutive skipped steps since the previous sync point
    stop: bool  # some rank received a stop signal
    logit_scale: float
    data: dict[str, float]  # the loader's good and bad sample counters over all ranks


class StopSignal:
    """Remembers SIGUSR1/SIGTERM; the loop acts on it at the next sync point (log or checkpoint step),
    agreed across ranks.

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
        log.warning("received %s: saving and stopping at the next log step", signal.Signals(signum).name)
        self.requested = True


def train(cfg: Config, *, allow_config_change: bool = False) -> Path:
    """Train according to `cfg`; returns the run directory. Collective under torchrun.

    A run directory with a checkpoint resumes from it; a config that differs from the
    checkpoint's in a field outside `config.SAFE_TO_CHANGE` is refused unless `allow_config_change`.
    """
    info = init_distributed(device=cfg.run.device)
    try:
        with training_marker(cfg.run_dir, enabled=info.is_main):
            try:
                return _train(cfg, info, allow_config_change=allow_config_change)
            except Preempted:
                if info.is_main:  # before training.json goes: a watcher never sees the run as stopped
                    (cfg.run_dir / PREEMPTED_MARKER).write_text(f"{EXIT_PREEMPTED}\n")
                raise
    finally:
        destroy_distributed()


def _train(cfg: Config, info: DistInfo, *, allow_config_change: bool) -> Path:
    run_dir = cfg.run_dir
    resume_from = ckpt.choose_checkpoint(run_dir / "checkpoints")  # rank 0's choice, on every rank
    if resume_from is not None:  # every rank decides alike on the same meta
        for key, (old, new) in check_resume_config(resume_from["config"], cfg,
                                                   allow_change=allow_config_change).items():
            log.warning("resuming with %s changed: %r -> %r", key, old, new)
    if info.is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        record_config(cfg, run_dir)
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
        world_size=info.world_size, seed=cfg.run.seed, device=info.device,
    )
    progress = Progress()
    checkpointer = build_checkpointer(cfg, model=model, optimizer=optimizer, loader=loader, scaler=scaler,
                                      progress=progress)
    rng_restored = resume_from is not None and checkpointer.load(resume_from)
    if not rng_restored:  # fresh start, or a rank the checkpoint's world did not have
        torch.manual_seed(cfg.run.seed * 1000 + info.rank + progress.step)  # per-rank stochastic layers
    # total_samples is the contract; the step count only feeds the progress bar (the batch may have changed)
    total_steps = progress.step + -(-(cfg.train.total_samples - progress.samples_seen) // cfg.train.global_batch_size)
    metrics = MetricsLogger(run_dir, cfg.log, enabled=info.is_main, total_steps=total_steps,
                            config=config_to_dict(cfg), start_step=progress.step)
    gmacs = gmacs_per_sample(bundle)
    if progress.step == 0:
        metrics.log({"step": 0, "params": count_params(unwrap(model)), "gmacs_per_sample": gmacs,
                     "world_size": info.world_size})
    start, t0 = progress.samples_seen, time.perf_counter()
    try:
        run_loop(cfg, info, model=model, optimizer=optimizer, loader=loader, bundle=bundle, scaler=scaler,
                 progress=progress, checkpointer=checkpointer, metrics=metrics, stop_signal=stop_signal,
                 flops_per_sample=model_flops_per_sample(cfg.model))
        checkpointer.wait()  # the last checkpoint is complete before the run says it is done
    finally:
        metrics.close()
    log.info("done: run=%s steps=%d samples_seen=%d skipped_steps=%d samples_per_s=%.1f minutes=%.2f",
             cfg.run.name, progress.step, progress.samples_seen, progress.skipped_steps,
             (progress.samples_seen - start) / (time.perf_counter() - t0), (time.perf_counter() - t0) / 60)
    return run_dir


def run_loop(cfg: Config, info: DistInfo, *, model, optimizer, loader, bundle: ModelBundle,
             progress: Progress, checkpointer: ckpt.Checkpointer, metrics: MetricsLogger,
             stop_signal: StopSignal, flops_per_sample: float, scaler: torch.amp.GradScaler | None = None) -> None:
    """Steps until `train.total_samples` are seen, with no host sync except at sync points: log steps and checkpoint
    steps, where every rank gathers the step statistics, agrees on the skip streak and the stop
    flag, maybe saves, and rank 0 logs. A stop signal is therefore acted on at the next sync point
    (at most `train.log_every_steps` steps later)."""
    batches = iter(loader)
    timer = StepTimer(info.device)
    tally = SkipTally(info.device)
    peak = peak_flops(torch.cuda.get_device_name(info.device)) if info.device.type == "cuda" else None
    global_batch, t = cfg.train.global_batch_size, cfg.train
    t_log, samples_at_log = time.perf_counter(), progress.samples_seen
    while progress.samples_seen < t.total_samples:
        timer.sync = (progress.step + 1) % t.log_every_steps == 0  # exact phase times on log steps
        # A new DataLoader iterator draws its base seed from the global RNG; forking keeps that draw
        # out of the model's random stream, or a resumed run would see other dropout masks.
        with torch.random.fork_rng(devices=[]):
            batch = next(batches)  # fetch
        images = normalize_images(batch.images_on(info.device), mean=bundle.mean, std=bundle.std)
        texts = batch.texts.to(info.device, non_blocking=True)
        timer.lap("data_s")
        lr = lr_at(progress.samples_seen + global_batch, cfg=cfg.optim, total_samples=t.total_samples)
        set_lr(optimizer, lr)
        result = train_step(model, images, texts, optimizer=optimizer, cfg=cfg, device=info.device,
                            timer=timer, scaler=scaler)
        tally.add(result.skipped)
        progress.step += 1
        progress.samples_seen += global_batch
        metrics.advance()

        last = progress.samples_seen >= t.total_samples
        checkpoint_due = crossed(progress.samples_seen, global_batch, t.checkpoint_every_samples) or last
        maybe_eval(cfg, model=unwrap(model), bundle=bundle, step=progress.step, samples_seen=progress.samples_seen,
                   batch_size=global_batch, checkpoint_due=checkpoint_due)
        if not (checkpoint_due or progress.step % t.log_every_steps == 0):
            continue
        stats = gather_step_stats(result, tally, model=model, loader=loader, stop_requested=stop_signal.requested)
        tally.reset()
        progress.skipped_steps += stats.skipped
        if stats.max_streak >= t.max_nonfinite_steps:
            checkpointer.save(progress, emergency=True)
            raise NonFiniteLoss(
                f"{stats.max_streak} consecutive steps with non-finite loss or gradients before step "
                f"{progress.step}; saved the weights (the non-finite updates were skipped). Lower "
                f"optim.lr_peak, set optim.grad_clip_norm, or use train.precision='bf16'")
        if checkpoint_due or stats.stop:
            checkpointer.save(progress, emergency=stats.stop)
        elapsed = time.perf_counter() - t_log
        per_device = (progress.samples_seen - samples_at_log) / elapsed / info.world_size
        t_log, samples_at_log = time.perf_counter(), progress.samples_seen
        metrics.log({
            "step": progress.step, "samples_seen": progress.samples_seen, "loss": stats.loss,
            "grad_norm": stats.grad_norm, "lr": lr, "logit_scale": stats.logit_scale,
            "samples_per_s": per_device * info.world_size, "samples_per_s_per_device": per_device,
            "mfu": mfu(flops_per_sample=flops_per_sample, samples_per_s_per_device=per_device, peak=peak),
            "skipped_steps": progress.skipped_steps, "max_memory_gb": max_memory_gb(info.device),
            **({"loss_scale": scaler.get_scale()} if scaler is not None and scaler.is_enabled() else {}),
            **timer.pop(), **stats.data,
        })
        if stats.stop:
            log.warning("stopped at step %d on a signal; start the run again to resume", progress.step)
            raise Preempted()


def train_step(model: torch.nn.Module, images: torch.Tensor, texts: torch.Tensor, *,
               optimizer: torch.optim.Optimizer, cfg: Config, device: torch.device,
               timer: StepTimer, scaler: torch.amp.GradScaler | None = None) -> StepResult:
    """One optimizer step on this rank's share of the global batch (B_rank samples), without a
    host-device sync.

    A step whose global gradient norm is non-finite updates nothing: the flag gates the fused
    AdamW kernel on the device (`step_unless`). The norm is of the synchronised gradients (DDP
    averages them, FSDP2 reduces the norm), so every rank skips alike without a collective of its
    own, and a non-finite loss makes it non-finite through backward. With an enabled `scaler`
    (fp16) the loss is scaled for backward and the gradients unscaled before the norm; the scale
    backs off from the scaler's own check of those same (synchronised) gradients. The
    gradient-cache path does its own backward with the same scale.
    """
    optimizer.zero_grad(set_to_none=True)
    scaling = scaler is not None and scaler.is_enabled()
    if cfg.train.chunk_size:
        with autocast(device, step_precision(cfg.train)):
            loss = gradcache_step(model, images, texts, chunk_size=cfg.train.chunk_size, loss_cfg=cfg.loss,
                                  scale_loss=scaler.scale if scaling else None)
        timer.lap("forward_backward_s")
    else:
        with autocast(device, step_precision(cfg.train)):
            out = model(images, texts)
        loss = contrastive_loss(cfg.loss, out["image_features"].float(), out["text_features"].float(),
                                out["logit_scale"].float(), out.get("logit_bias"))
        timer.lap("forward_s")
        (scaler.scale(loss) if scaling else loss).backward()
        timer.lap("backward_s")
    if scaling:
        scaler.unscale_(optimizer)
    grad_norm = global_grad_norm(model, max_norm=cfg.optim.grad_clip_norm)
    skipped = ~torch.isfinite(grad_norm)
    step_unless(optimizer, skipped)
    if scaling:
        scaler.update()  # on the device: backs off and restarts the growth interval on non-finite grads
    with torch.no_grad():
        unwrap(model).logit_scale.clamp_(0, MAX_LOGIT_SCALE)
    timer.lap("optimizer_s")
    return StepResult(loss=loss.detach(), grad_norm=grad_norm, skipped=skipped)


def gather_step_stats(result: StepResult, tally: SkipTally, *, model, loader, stop_requested: bool) -> StepStats:
    """Collective: every rank calls it at every sync point, never from inside a rank-0 branch.

    One all_gather carries the loss, gradient norm, skip counts and stop flag of every rank (the
    only host sync of the interval); the logit scale is gathered when FSDP2 shards it, and the
    loader counters with the loader states.
    """
    stop = torch.tensor(float(stop_requested), device=result.loss.device)
    rows = gather_rows(torch.stack([result.loss.float(), result.grad_norm.float(), tally.skipped,
                                    tally.max_streak, stop]))  # (world_size, 5)
    loss, grad_norm, skipped, max_streak, stop = zip(*rows.tolist())  # host sync: sync points only
    return StepStats(loss=sum(loss) / len(loss), grad_norm=grad_norm[0], skipped=int(max(skipped)),
                     max_streak=int(max(max_streak)), stop=any(stop),
                     logit_scale=full_tensor(unwrap(model).logit_scale).exp().item(),
                     data=data_counters(loader))


def global_loader_state(loader) -> dict:
    """The loader state of the whole job, each stream's entry taken from the rank that owns it."""
    states = gather_objects(loader.state_dict())
    return states[0] if len(states) == 1 else merge_rank_states(states)


def data_counters(loader) -> dict[str, float]:
    """Good and bad sample counts of all ranks' streams, for the metrics (one gather per log step)."""
    streams = global_loader_state(loader)["streams"]
    return {f"data_{k}": v for k, v in sum_counters(st["totals"] for st in streams).items()}


def build_checkpointer(cfg: Config, *, model, optimizer, loader, progress: Progress,
                       scaler: torch.amp.GradScaler | None = None) -> ckpt.Checkpointer:
    """The job's training state as the checkpointer's Statefuls (each rank's RNG states are added by it)."""
    states = {
        "model": ckpt.ModelState(model), "optim": ckpt.OptimizerState(model, optimizer),
        "progress": ckpt.PlainState(lambda: dataclasses.asdict(progress), lambda d: vars(progress).update(d)),
        "loader": ckpt.PlainState(lambda: global_loader_state(loader), loader.load_state_dict),
    }
    if scaler is not None and scaler.is_enabled():  # the exact loss scale continues
        states["grad_scaler"] = ckpt.PlainState(scaler.state_dict, scaler.load_state_dict)
    return ckpt.Checkpointer(
        cfg.run_dir / "checkpoints", states=states, meta={"config": config_to_dict(cfg)},
        async_periodic=cfg.train.async_checkpoint,
        policy=ckpt.RetentionPolicy(keep_last=cfg.train.keep_last, keep_every_samples=cfg.train.keep_every_samples))


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
