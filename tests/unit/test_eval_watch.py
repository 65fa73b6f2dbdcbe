"""Evaluating a run while it trains: checkpoints pruned after they were listed, a watcher that ends when
training stops short of its final checkpoint, and rows naming the upstream dataset (`data.name`)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from clipscale import checkpoint as ckpt
from clipscale.checkpoint import complete_checkpoints
from clipscale.config import Config, EvalConfig, RunConfig, TrainConfig, record_config
from clipscale.data.config import DataConfig, default_dataset_name
from clipscale.evaluate.runner import evaluate_run, run_config, watch_run
from clipscale.models import build_model
from clipscale.run_state import PREEMPTED, TRAINING, training_marker, training_stopped
from clipscale.train import Progress
from tests.eval_kit import write_classification_set


def make_run(tmp_path, *, steps=(2, 4), total_steps=6, name=None):
    """A run directory as training leaves it after `steps` (of `total_steps`), without training."""
    evalset = write_classification_set(tmp_path / "set", [[(k, k) for k in range(8)]])
    cfg = Config(run=RunConfig(name="w", output_dir=str(tmp_path / "runs"), device="cpu"),
                 data=DataConfig(train_shards="data/laion-mini/train/{000..009}.tar", name=name),
                 train=TrainConfig(global_batch_size=32, total_samples=32 * total_steps),
                 eval=EvalConfig(datasets=(f"s={evalset}",), tasks=("zeroshot_classification",), num_workers=0,
                                 batch_size=8))
    run = cfg.run_dir
    run.mkdir(parents=True)
    record_config(cfg, run)
    for step in steps:
        saver(cfg).save(Progress(step=step, samples_seen=32 * step))
    return run


def saver(cfg: Config, *, keep_last: int = 0) -> ckpt.Checkpointer:
    """A checkpointer of the run's (untrained) model, as training's saves it."""
    torch.manual_seed(0)
    model = build_model(cfg.model, device=torch.device("cpu")).model
    return ckpt.Checkpointer(cfg.run_dir / "checkpoints", states={"model": ckpt.ModelState(model)},
                             policy=ckpt.RetentionPolicy(keep_last=keep_last))


def test_a_checkpoint_pruned_after_it_was_listed_is_skipped(tmp_path):
    run = make_run(tmp_path, steps=(2, 4, 6, 8))
    listed = complete_checkpoints(run / "checkpoints")
    os.replace(listed[0], f"{listed[0]}.pruned")  # training's retention, between the watcher's listing and its loading
    shutil.rmtree(listed[1])  # ... and once it has deleted it
    rows = evaluate_run(run, device="cpu", checkpoints=listed)
    assert sorted({r["checkpoint"] for r in rows}) == ["step_000006", "step_000008"]
    assert {r["dataset"] for r in rows} == {"laion-mini"}  # data.name derived from the shards' directory
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == ["step_000006", "step_000008"]


def test_retention_renames_a_checkpoint_before_deleting_it(tmp_path, monkeypatch):
    """A watcher that listed a pruned checkpoint finds it gone under its name, never half deleted."""
    run = make_run(tmp_path, steps=(2, 4))
    deleted, rmtree = [], shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda path, **kw: (deleted.append(Path(path).name), rmtree(path, **kw)))
    saver(run_config(run), keep_last=1).save(Progress(step=6, samples_seen=32 * 6))
    assert {"step_000002.pruned", "step_000004.pruned"} <= set(deleted)
    assert all("." in name for name in deleted)  # never deleted under a complete checkpoint's name
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000006"]


def watch_in_thread(run, **options):
    """watch_run's rows, or a failure if it is still watching after a generous wait."""
    out = {}
    thread = threading.Thread(target=lambda: out.update(rows=watch_run(run, device="cpu", **options)), daemon=True)
    thread.start()
    thread.join(timeout=300)
    assert not thread.is_alive(), "the watcher did not end"
    return out["rows"]


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("owner", [None, "dead", "elsewhere"])
def test_the_watcher_ends_when_training_stopped_short_of_its_final_checkpoint(tmp_path, owner):
    run = make_run(tmp_path, name="laion-400m-subset")  # steps 2 and 4 of 6: the final checkpoint never comes
    if owner == "dead":  # killed on this host: its marker is left behind
        (run / TRAINING).write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid()}))
    elif owner == "elsewhere":  # alive or not, on a host we cannot look at: only the run's silence tells
        (run / TRAINING).write_text(json.dumps({"host": "another-node", "pid": 1}))
    rows = watch_in_thread(run, poll_s=0.05, idle_timeout_s=3600 if owner != "elsewhere" else 0.5)
    assert sorted({r["step"] for r in rows}) == [2, 4]
    assert {r["dataset"] for r in rows} == {"laion-400m-subset"}


def test_training_marker_tells_whether_training_lives(tmp_path):
    assert "training is not running" in training_stopped(tmp_path)
    (tmp_path / PREEMPTED).write_text("75\n")
    assert training_stopped(tmp_path) is None  # saved on a signal: its job comes back
    with pytest.raises(RuntimeError), training_marker(tmp_path, enabled=True):
        assert not (tmp_path / PREEMPTED).exists() and training_stopped(tmp_path) is None
        raise RuntimeError("training failed")
    assert not (tmp_path / TRAINING).exists() and "not running" in training_stopped(tmp_path)


@pytest.mark.parametrize(("spec", "name"), [
    ("data/laion400m/{00000..41407}.tar", "laion400m"),
    ("s3://bucket/datacomp/shards/{0000..1023}.tar", "datacomp"),
    ("pipe:curl -s -L https://host/cc12m/{00000..01242}.tar", "cc12m"),
    ("a/laion/{0..9}.tar::b/coyo/train/{0..9}.tar", "laion+coyo"),
])
def test_the_dataset_name_defaults_to_the_shards_directory(spec, name):
    assert default_dataset_name(spec) == name
    assert DataConfig(train_shards=spec).dataset_name == name
    assert DataConfig(train_shards=spec, name="mine").dataset_name == "mine"
