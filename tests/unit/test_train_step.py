"""The optimizer step's guards: non-finite steps are skipped on the device, a streak of them stops
the run, and a step reads no value back from the device (the loop syncs on log steps only)."""
import contextlib
import itertools
import logging
import os
import signal

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from clipscale import checkpoint as ckpt
from clipscale.config import load_config
from clipscale.data.pipeline import Batch
from clipscale.dist import DistInfo
from clipscale.metrics import MetricsLogger, StepTimer
from clipscale.models import build_model
from clipscale.optim import build_optimizer
from clipscale.train import (NonFiniteLoss, Preempted, Progress, Run, SkipTally, StopSignal, build_checkpointer,
                             run_loop, train_step)


class RandomBatches:
    """A stand-in for the shard loader: random uint8 images and tokens, same interface."""

    def __init__(self, batch: int, image_size: int, context_length: int):
        self.shape = (batch, image_size, context_length)

    def __iter__(self):
        gen = torch.Generator().manual_seed(0)
        b, s, l = self.shape
        for i in itertools.count():
            yield Batch(image_parts=[torch.randint(0, 256, (b, 3, s, s), dtype=torch.uint8, generator=gen)],
                        texts=torch.randint(0, 1000, (b, l), generator=gen), keys=[str(i)] * b)

    def state_dict(self):
        return {"streams": []}

    def load_state_dict(self, state):
        assert state == {"streams": []}

    def counters(self):
        return {}


def setup(tmp_path, *overrides):
    cfg = load_config(None, [f'run.output_dir="{tmp_path}"', "train.global_batch_size=8",
                             "train.total_samples=80", "model.vision_width=32", "model.text_width=32",
                             "model.embed_dim=16", "train.max_nonfinite_steps=3",
                             "train.async_checkpoint=false", *overrides])  # saves complete before the loop returns
    torch.manual_seed(0)
    bundle = build_model(cfg.model)
    return cfg, bundle, build_optimizer(bundle.model, cfg.optim)


def make_run(cfg, bundle, opt, *, stop_signal=None, loader=None) -> tuple[Run, Progress]:
    """The loop's parts around a model on one process (no run directory writes but checkpoints), and
    the progress its checkpointer saves."""
    (cfg.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    metrics = MetricsLogger(cfg.run_dir, cfg.log, enabled=False, total_steps=10, config={})
    progress, loader = Progress(), loader or RandomBatches(8, 32, 32)
    checkpointer = build_checkpointer(cfg, model=bundle.model, optimizer=opt, loader=loader, progress=progress)
    return Run(cfg=cfg, info=DistInfo(), model=bundle.model, optimizer=opt, loader=loader, bundle=bundle,
               metrics=metrics, checkpointer=checkpointer, stop_signal=stop_signal or StopSignal(),
               flops_per_sample=1.0), progress


def assert_never_stepped(opt):
    """AdamW's state is that of an optimizer that has not stepped: step 0, zero moments."""
    for state in opt.state.values():
        assert state["step"] == 0
        assert not state["exp_avg"].any() and not state["exp_avg_sq"].any()


def test_non_finite_step_is_skipped(tmp_path):
    cfg, bundle, opt = setup(tmp_path)
    before = {n: p.detach().clone() for n, p in bundle.model.named_parameters()}
    images = torch.full((8, 3, 32, 32), float("nan"))
    texts = torch.randint(0, 1000, (8, 32))
    result = train_step(bundle.model, images, texts, optimizer=opt, cfg=cfg, device=torch.device("cpu"),
                        timer=StepTimer(torch.device("cpu")))
    assert result.skipped
    assert all(torch.equal(p, before[n]) for n, p in bundle.model.named_parameters())
    assert_never_stepped(opt)

    result = train_step(bundle.model, torch.randn(8, 3, 32, 32), texts, optimizer=opt, cfg=cfg,
                        device=torch.device("cpu"), timer=StepTimer(torch.device("cpu")))
    assert not result.skipped and torch.isfinite(result.loss)
    assert not torch.equal(bundle.model.visual.conv1.weight, before["visual.conv1.weight"])


def test_a_streak_of_non_finite_steps_saves_and_stops(tmp_path):
    cfg, bundle, opt = setup(tmp_path, "train.log_every_steps=3")  # the streak is checked on log steps
    with torch.no_grad():
        bundle.model.text_projection.fill_(float("inf"))  # every loss from now on is NaN
    with pytest.raises(NonFiniteLoss, match="3 consecutive steps with non-finite loss"):
        run_loop(*make_run(cfg, bundle, opt))
    saved = ckpt.latest_checkpoint(cfg.run_dir / "checkpoints")
    meta = ckpt.read_meta(saved)
    assert meta["step"] == 3 and meta["skipped_steps"] == 3


def test_wandb_offline_logs_locally(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    metrics = MetricsLogger(tmp_path, load_config(None, ["log.wandb='offline'"]).log, enabled=True,
                            total_steps=2, config={"train": {"global_batch_size": 8}})
    metrics.log({"step": 1, "loss": 1.5})
    metrics.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    assert (tmp_path / "metrics.jsonl").read_text().strip() == '{"step": 1, "loss": 1.5}'


def test_fp16_skipped_step_backs_off_the_loss_scale(tmp_path):
    cfg, bundle, opt = setup(tmp_path, "train.precision=fp16")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    texts = torch.randint(0, 1000, (8, 32))
    before = bundle.model.visual.conv1.weight.detach().clone()
    step = dict(optimizer=opt, cfg=cfg, device=torch.device("cpu"), timer=StepTimer(torch.device("cpu")), scaler=scaler)
    result = train_step(bundle.model, torch.full((8, 3, 32, 32), float("nan")), texts, **step)
    assert result.skipped and scaler.get_scale() == 2.0**9
    assert torch.equal(bundle.model.visual.conv1.weight, before)
    assert_never_stepped(opt)

    result = train_step(bundle.model, torch.randn(8, 3, 32, 32), texts, **step)
    assert not result.skipped and torch.isfinite(result.loss) and scaler.get_scale() == 2.0**9
    assert not torch.equal(bundle.model.visual.conv1.weight, before)


def test_fp16_skipped_step_restarts_the_growth_interval(tmp_path):
    cfg, bundle, opt = setup(tmp_path, "train.precision=fp16")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    texts = torch.randint(0, 1000, (8, 32))
    step = dict(optimizer=opt, cfg=cfg, device=torch.device("cpu"), timer=StepTimer(torch.device("cpu")), scaler=scaler)
    scales = []
    for images in (torch.randn(8, 3, 32, 32), torch.full((8, 3, 32, 32), float("nan")),
                   torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)):
        train_step(bundle.model, images, texts, **step)
        scales.append(scaler.get_scale())
    # good (1 of 2), skipped (back off, count restarts), good (1 of 2), good (2 of 2: grow)
    assert scales == [2.0**10, 2.0**9, 2.0**9, 2.0**10]


class CountDeviceReads(TorchDispatchMode):
    """Counts reads of tensor values into Python (`.item()`, `.tolist()`, `bool(t)`, ...): each is a
    host-device sync on a GPU."""

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("overrides", [(), ("train.chunk_size=3",), ("train.precision=fp16",)])
def test_a_step_reads_no_device_value(tmp_path, overrides):
    """Skipping included: the non-finite check gates the update on the device."""
    cfg, bundle, opt = setup(tmp_path, *overrides)
    scaler = torch.amp.GradScaler("cpu", enabled=cfg.train.precision == "fp16")
    texts = torch.randint(0, 1000, (8, 32))
    for images in (torch.randn(8, 3, 32, 32), torch.full((8, 3, 32, 32), float("nan"))):
        with CountDeviceReads() as counter:
            result = train_step(bundle.model, images, texts, optimizer=opt, cfg=cfg, device=torch.device("cpu"),
                                timer=StepTimer(torch.device("cpu")), scaler=scaler)
        assert counter.reads == 0
    assert result.skipped  # the last (NaN) step was skipped, decided without reading it


def test_a_stop_signal_is_acted_on_at_the_next_log_step(tmp_path):
    cfg, bundle, opt = setup(tmp_path, "train.log_every_steps=4")
    stop_signal = StopSignal()
    stop_signal.received = signal.SIGUSR1  # as if SIGUSR1 arrived during step 1
    with pytest.raises(Preempted):
        run_loop(*make_run(cfg, bundle, opt, stop_signal=stop_signal))
    assert ckpt.read_meta(ckpt.latest_checkpoint(cfg.run_dir / "checkpoints"))["step"] == 4
    assert (cfg.run_dir / "preempted").read_text().strip() == "75"  # written before any rank exits


def test_skip_tally_counts_skips_and_the_longest_streak_on_the_device():
    tally = SkipTally(torch.device("cpu"))
    for skipped in (True, True, False, True):
        tally.add(torch.tensor(skipped))
    assert (tally.skipped.item(), tally.streak.item(), tally.max_streak.item()) == (3, 1, 2)
    tally.reset()  # a sync point: counts restart, the running streak carries on
    tally.add(torch.tensor(True))
    assert (tally.skipped.item(), tally.streak.item(), tally.max_streak.item()) == (1, 2, 2)


def test_the_signal_handler_only_records_and_the_sync_point_logs(tmp_path, caplog):
    """A handler that logs can re-enter a half-done write to the same stream: it records the signal,
    and the loop logs it at the sync point where it acts on it."""
    cfg, bundle, opt = setup(tmp_path, "train.log_every_steps=2")
    stop_signal = StopSignal()
    with caplog.at_level(logging.DEBUG):
        os.kill(os.getpid(), signal.SIGTERM)  # the real handler, run by the interpreter
        assert stop_signal.received == signal.SIGTERM and caplog.records == []
        with pytest.raises(Preempted):
            run_loop(*make_run(cfg, bundle, opt, stop_signal=stop_signal))
    assert "received SIGTERM: saving and stopping at step 2" in caplog.text


class CountingBatches(RandomBatches):
    """Counts the iterators the loop opens and closes: each holds DataLoader workers in training."""

    def __init__(self, *args):
        super().__init__(*args)
        self.opened = self.closed = 0

    def __iter__(self):
        self.opened += 1
        try:
            yield from super().__iter__()
        finally:
            self.closed += 1


@pytest.mark.parametrize("stop", ["end", "preempted", "non-finite"])
def test_the_loop_closes_its_batch_iterator_on_every_exit(tmp_path, stop):
    """Closing the iterator is what shuts the loader's workers down at once (issue: a rank leaving on
    an error waited forever at exit for a worker that its live iterator kept waiting)."""
    cfg, bundle, opt = setup(tmp_path, "train.log_every_steps=2", "train.total_samples=32")
    loader, stop_signal = CountingBatches(8, 32, 32), StopSignal()
    if stop == "preempted":
        stop_signal.received = signal.SIGUSR1
    if stop == "non-finite":
        with torch.no_grad():
            bundle.model.text_projection.fill_(float("inf"))
    with contextlib.suppress(Preempted, NonFiniteLoss):
        run_loop(*make_run(cfg, bundle, opt, stop_signal=stop_signal, loader=loader))
    assert (loader.opened, loader.closed) == (1, 1)


def test_evaluation_runs_only_when_due(tmp_path, monkeypatch):
    """`maybe_eval` is called at the steps crossing eval.every_samples, not at every step."""
    from clipscale import train as train_module

    calls = []
    monkeypatch.setattr(train_module, "maybe_eval", lambda cfg, **kw: calls.append(kw["step"]))
    cfg, bundle, opt = setup(tmp_path, "train.log_every_steps=5", "eval.every_samples=20")
    run_loop(*make_run(cfg, bundle, opt))
    assert calls == [3, 5, 8, 10]  # 8 samples a step: 24, 40, 64, 80 cross multiples of 20


def test_sync_points_are_log_checkpoint_and_evaluation_steps():
    from clipscale.train import due_after

    cfg = load_config(None, ["train.global_batch_size=24", "train.total_samples=240", "train.log_every_steps=4",
                             "train.checkpoint_every_samples=100", "eval.every_samples=50"])
    due = {step: due_after(step, step * 24, cfg=cfg) for step in range(1, 11)}  # step 10 reaches 240: the last
    assert [s for s, d in due.items() if d.log] == [4, 8]
    assert [s for s, d in due.items() if d.checkpoint] == [5, 9, 10]  # 120, 216 cross 100, 200; and the end
    assert [s for s, d in due.items() if d.eval] == [3, 5, 7, 9]  # 72, 120, 168, 216 cross 50, 100, 150, 200
    assert [s for s, d in due.items() if d.sync] == [3, 4, 5, 7, 8, 9, 10]


def test_progress_bar_shows_no_loss_before_the_first_logged_one(tmp_path, capsys):
    metrics = MetricsLogger(tmp_path, load_config(None, []).log, enabled=True, total_steps=2, config={})
    metrics.log({"step": 0, "params": 10, "gmacs_per_sample": 0.5})  # what training logs before its first step
    metrics.advance()
    assert not metrics.bar.postfix
    metrics.log({"step": 1, "loss": 1.5})
    assert metrics.bar.postfix == "loss=1.5000"
    metrics.close()
    assert "nan" not in capsys.readouterr().err
