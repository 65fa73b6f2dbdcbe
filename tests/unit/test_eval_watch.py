"""Evaluating a run while it trains: checkpoints pruned after they were listed, a watcher that ends when
training stops short of its final checkpoint, and rows naming the upstream dataset (`data.name`)."""
import json
import shutil
import socket
import subprocess
import sys
import threading

import pytest
import torch

from clipscale.checkpoint import _prune, complete_checkpoints, save_checkpoint
from clipscale.config import Config, EvalConfig, RunConfig, TrainConfig, save_config
from clipscale.data.config import DataConfig, default_dataset_name
from clipscale.evaluate.runner import evaluate_run, watch_run
from clipscale.models import build_model
from clipscale.run_state import PREEMPTED, TRAINING, training_marker, training_stopped
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
    save_config(cfg, run / "config.json")
    torch.manual_seed(0)
    model = build_model(cfg.model, device=torch.device("cpu")).model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in steps:
        save_checkpoint(run / "checkpoints", model=model, optimizer=optimizer, step=step,
                        meta={"samples_seen": 32 * step})
    return run


def test_a_checkpoint_pruned_after_it_was_listed_is_skipped(tmp_path):
    run = make_run(tmp_path, steps=(2, 4, 6))
    listed = complete_checkpoints(run / "checkpoints")
    shutil.rmtree(listed[0])  # training's retention, between the watcher's listing and its loading
    rows = evaluate_run(run, device="cpu", checkpoints=listed)
    assert sorted({r["checkpoint"] for r in rows}) == ["step_000004", "step_000006"]
    assert {r["dataset"] for r in rows} == {"laion-mini"}  # data.name derived from the shards' directory

    _prune(run / "checkpoints", keep_last=1, keep_every_samples=0)  # renames before deleting
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
