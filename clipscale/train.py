"""The training loop: fetch -> step -> at a sync point: agree -> act -> log, over a global batch.

    python -m clipscale train recipes/tiny_cpu.toml                        # one process
    torchrun --nproc_per_node=2 -m clipscale train recipes/tiny_cpu.toml   # DDP/FSDP2, gloo or NCCL
    clipscale train RECIPE train.global_batch_size=512 run.name=b512       # dotted overrides

The run directory `RUN_DIR = run.output_dir/run.name` holds config.json, metrics.jsonl and
checkpoints/ (and training.json while training: `clipscale.run_state`); starting a run whose
directory has a complete checkpoint resumes from it.
SIGUSR1, SIGTERM or SIGINT (Ctrl-C): at the next sync point (so within `train.log_every_steps`
steps) a checkpoint is saved, the `preempted` marker written and every rank exits with
`EXIT_PREEMPTED`, so a scheduler can requeue the job and the next start resumes; a second Ctrl-C
stops at once. Steps between sync points run without a host-device sync.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch

from clipscale import checkpoint as ckpt
from clipscale.compute import gmacs_per_sample, model_flops_per_sample
from clipscale.config import Config, check_resume_config, config_to_dict, record_config
from clipscale.data.pipeline import (build_train_loader, kill_loader_workers, merge_rank_states, normalize_images,
                                    sum_counters)
from clipscale.dist import (DistInfo, StopSignal, destroy_distributed, gather_objects, gather_rows, init_distributed,
                            main_does)
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


@dataclasses.dataclass(frozen=True)
class Run:
    """The parts of a training run that the loop drives, built once by `_train`."""

    cfg: Config
    info: DistInfo
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: Any  # iterable of `Batch` with state_dict() (TrainLoader)
    bundle: ModelBundle
    metrics: MetricsLogger
    checkpointer: ckpt.Checkpointer
    stop_signal: StopSignal
    flops_per_sample: float
    scaler: torch.amp.GradScaler | None = None


@dataclasses.dataclass(frozen=True)
class Due:
    """What is due after a step; any of it makes the step a sync point."""

    log: bool
    checkpoint: bool
    eval: bool

    @property
    def sync(self) -> bool:
        return self.log or self.checkpoint or self.eval


def due_after(step: int, samples_seen: int, *, cfg: Config) -> Due:
    """What is due once the run has reached `step` and `samples_seen` (a pure function of progress);
    the step that reaches `train.total_samples` is the last and always checkpoints."""
    batch, last = cfg.train.global_batch_size, samples_seen >= cfg.train.total_samples
    return Due(log=step % cfg.train.log_every_steps == 0,
               checkpoint=last or crossed(samples_seen, batch, cfg.train.checkpoint_every_samples),
               eval=crossed(samples_seen, batch, cfg.eval.every_samples))


@dataclasses.dataclass
class Meters:
    """What the loop measures between sync points: phase times, skipped steps, throughput."""

    timer: StepTimer
    tally: SkipTally
    samples_at_log: int
    peak_flops: float | None  # per device, for the MFU
    t_log: float = dataclasses.field(default_factory=time.perf_counter)

    def samples_per_s(self, samples_seen: int) -> float:
        """Samples per second since the previous call (the previous logged line)."""
        now = time.perf_counter()
        rate = (samples_seen - self.samples_at_log) / (now - self.t_log)
        self.samples_at_log, self.t_log = samples_seen, now
        return rate


def train(cfg: Config, *, allow_config_change: bool = False) -> Path:
    """Train according to `cfg`; returns the run directory. Collective under torchrun.

    A run directory with a checkpoint resumes from it; a config that differs from the
    checkpoint's in a field outside `config.SAFE_TO_CHANGE` is refused unless `allow_config_change`.
    Every way out is bounded: the loader's workers are shut down (and killed if stuck), and a rank
    whose peers are gone fails its next collective within `train.collective_timeout_s`.
    """
    info = init_distributed(device=cfg.run.device, timeout_s=cfg.train.collective_timeout_s)
    try:
        return _train(cfg, info, allow_config_change=allow_config_change)
    finally:
        kill_loader_workers()
        destroy_distributed()


def _train(cfg: Config, info: DistInfo, *, allow_config_change: bool) -> Path:
    run_dir = cfg.run_dir
    resume_from = ckpt.choose_checkpoint(run_dir / "checkpoints")  # rank 0's choice, on every rank
    if resume_from is not None:  # every rank decides alike on the same meta, before anything is built
        for key, (old, new) in check_resume_config(resume_from["config"], cfg,
                                                   allow_change=allow_config_change).items():
            log.warning("resuming with %s changed: %r -> %r", key, old, new)
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
    if info.is_main:  # only now: a start that fails to build leaves no run directory behind
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        record_config(cfg, run_dir)
    # training.json while the run trains (rank 0); the start removes a previous one's preempted marker
    with training_marker(run_dir, enabled=info.is_main):
        progress = Progress()
        checkpointer = build_checkpointer(cfg, model=model, optimizer=optimizer, loader=loader, scaler=scaler,
                                          progress=progress)
        rng_restored = resume_from is not None and checkpointer.load(resume_from)
        if not rng_restored:  # fresh start, or a rank the checkpoint's world did not have
            torch.manual_seed(cfg.run.seed * 1000 + info.rank + progress.step)  # per-rank stochastic layers
        # total_samples is the contract; the step count only feeds the progress bar (the batch may have changed)
        total_steps = progress.step + -(-(cfg.train.total_samples - progress.samples_seen)
                                        // cfg.train.global_batch_size)
        metrics = MetricsLogger(run_dir, cfg.log, enabled=info.is_main, total_steps=total_steps,
                                config=config_to_dict(cfg), start_step=progress.step)
        gmacs = gmacs_per_sample(bundle)
        if progress.step == 0:
            metrics.log({"step": 0, "params": count_params(unwrap(model)), "gmacs_per_sample": gmacs,
                         "world_size": info.world_size})
        start, t0 = progress.samples_seen, time.perf_counter()
        run = Run(cfg=cfg, info=info, model=model, optimizer=optimizer, loader=loader, bundle=bundle, metrics=metrics,
                  checkpointer=checkpointer, stop_signal=stop_signal,
                  flops_per_sample=model_flops_per_sample(cfg.model), scaler=scaler)
        try:
            run_loop(run, progress)
            checkpointer.wait()  # the last checkpoint is complete before the run says it is done
        finally:
            metrics.close()
    log.info("done: run=%s steps=%d samples_seen=%d skipped_steps=%d samples_per_s=%.1f minutes=%.2f",
             cfg.run.name, progress.step, progress.samples_seen, progress.skipped_steps,
             (progress.samples_seen - start) / (time.perf_counter() - t0), (time.perf_counter() - t0) / 60)
    return run_dir


def run_loop(run: Run, progress: Progress) -> None:
    """Steps until `train.total_samples` are seen: fetch -> step, and at a sync point (log, checkpoint
    and evaluation steps) agree -> act -> log (`at_sync_point`). Between sync points nothing reads
    the device, so a stop signal is acted on at the next sync point (at most
    `train.log_every_steps` steps later)."""
    cfg, info, global_batch = run.cfg, run.info, run.cfg.train.global_batch_size
    peak = peak_flops(torch.cuda.get_device_name(info.device)) if info.device.type == "cuda" else None
    meters = Meters(timer=StepTimer(info.device), tally=SkipTally(info.device), samples_at_log=progress.samples_seen,
                    peak_flops=peak)
    with contextlib.closing(iter(run.loader)) as batches:  # closing: the loader's workers leave on any exit
        while progress.samples_seen < cfg.train.total_samples:
            due = due_after(progress.step + 1, progress.samples_seen + global_batch, cfg=cfg)
            meters.timer.sync = due.sync  # exact phase times on sync points only
            # A new DataLoader iterator draws its base seed from the global RNG; forking keeps that draw
            # out of the model's random stream, or a resumed run would see other dropout masks.
            with torch.random.fork_rng(devices=[]):
                batch = next(batches)  # fetch
            images = normalize_images(batch.images_on(info.device), mean=run.bundle.mean, std=run.bundle.std)
            texts = batch.texts.to(info.device, non_blocking=True)
            meters.timer.lap("data_s")
            lr = lr_at(progress.samples_seen + global_batch, cfg=cfg.optim, total_samples=cfg.train.total_samples)
            set_lr(run.optimizer, lr)
            result = train_step(run.model, images, texts, optimizer=run.optimizer, cfg=cfg, device=info.device,
                                timer=meters.timer, scaler=run.scaler)  # step
            meters.tally.add(result.skipped)
            progress.step += 1
            progress.samples_seen += global_batch
            run.metrics.advance()
            if due.sync:
                at_sync_point(run, progress, meters, result=result, due=due, lr=lr)


def at_sync_point(run: Run, progress: Progress, meters: Meters, *, result: StepResult, due: Due, lr: float) -> None:
    """Collective, on every rank: agree on the step statistics and the stop flag, act on them (a
    non-finite streak stops after an emergency save; evaluate, checkpoint or stop when due), log.
    Raises NonFiniteLoss or Preempted to end the run. The saves for either are emergency saves
    (synchronous, never pruning: the newest checkpoint before the trouble may be the last good one)."""
    cfg, received = run.cfg, run.stop_signal.received  # read once: a signal may arrive meanwhile
    stats = gather_step_stats(result, meters.tally, model=run.model, loader=run.loader,
                              stop_requested=received is not None)  # agree
    meters.tally.reset()
    progress.skipped_steps += stats.skipped
    if stats.max_streak >= cfg.train.max_nonfinite_steps:
        run.checkpointer.save(progress, emergency=True)
        raise NonFiniteLoss(
            f"{stats.max_streak} consecutive steps with non-finite loss or gradients before step "
            f"{progress.step}; saved the weights (the non-finite updates were skipped). Lower "
            f"optim.lr_peak, set optim.grad_clip_norm, or use train.precision='bf16'")
    if received is not None:  # logged here, not in the signal handler
        log.warning("received %s: saving and stopping at step %d", received.name, progress.step)
    if due.eval:
        maybe_eval(cfg, model=unwrap(run.model), bundle=run.bundle, step=progress.step,
                   samples_seen=progress.samples_seen, batch_size=cfg.train.global_batch_size,
                   checkpoint_due=due.checkpoint)
    if due.checkpoint or stats.stop:
        run.checkpointer.save(progress, emergency=stats.stop)
    log_step(run, progress, meters, stats=stats, lr=lr)
    if stats.stop:
        stop_preempted(run, progress)


def log_step(run: Run, progress: Progress, meters: Meters, *, stats: StepStats, lr: float) -> None:
    """One metrics line (rank 0 writes it)."""
    info, scaler = run.info, run.scaler
    per_device = meters.samples_per_s(progress.samples_seen) / info.world_size
    run.metrics.log({
        "step": progress.step, "samples_seen": progress.samples_seen, "loss": stats.loss,
        "grad_norm": stats.grad_norm, "lr": lr, "logit_scale": stats.logit_scale,
        "samples_per_s": per_device * info.world_size, "samples_per_s_per_device": per_device,
        "mfu": mfu(flops_per_sample=run.flops_per_sample, samples_per_s_per_device=per_device, peak=meters.peak_flops),
        "skipped_steps": progress.skipped_steps, "max_memory_gb": max_memory_gb(info.device),
        **({"loss_scale": scaler.get_scale()} if scaler is not None and scaler.is_enabled() else {}),
        **meters.timer.pop(), **stats.data,
    })


def stop_preempted(run: Run, progress: Progress) -> None:
    """After the stop's checkpoint: rank 0 writes the `preempted` marker (the one place it is written),
    which tells slurm/train.sbatch to requeue (torchrun's exit code cannot), before any rank exits:
    a launcher that kills the other ranks once one exits (`srun --kill-on-bad-exit=1`) cannot race
    the marker, and a watcher sees it before training.json goes (`clipscale.run_state`)."""
    marker = run.cfg.run_dir / PREEMPTED
    main_does(lambda: marker.write_text(f"{EXIT_PREEMPTED}\n"), what=f"writing {marker}")
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
        async_periodic=cfg.train.async_checkpoint, collective_timeout_s=cfg.train.collective_timeout_s,
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
