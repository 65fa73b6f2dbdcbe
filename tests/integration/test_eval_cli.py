"""The evaluation CLI end to end: evaluation during 2-rank training, `clipscale eval` on runs and exported
models, `clipscale results`, and agreement with CLIP_benchmark's own zero-shot code."""
import csv
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from clip_benchmark.metrics import zeroshot_classification as cb
from PIL import Image

from clipscale.results import read_rows
from tests.eval_kit import json_rows
from tests.helpers import REPO, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def evaluated_run(synthetic_data, tmp_path_factory):
    """2 ranks, 6 steps of 32, a checkpoint and an evaluation every 64 samples."""
    out = tmp_path_factory.mktemp("runs")
    run_cli("train", f'data.train_shards="{synthetic_data["train"]}"',
            f'eval.datasets=["synthetic={synthetic_data["zeroshot"]}"]', "eval.every_samples=64", "eval.num_workers=1",
            f'run.output_dir="{out}"', "run.name=ev", "log.progress_bar=false", "train.global_batch_size=32",
            "train.total_samples=192", "train.checkpoint_every_samples=64", "data.workers=1", nproc=2)
    return out / "ev"


def test_training_evaluates_on_all_ranks_and_eval_skips_those_rows(evaluated_run):
    rows = json_rows(evaluated_run / "results.jsonl")
    assert [(r["checkpoint"], r["step"], r["samples_seen"]) for r in rows[::3]] == [
        ("step_000002", 2, 64), ("step_000004", 4, 128), ("step_000006", 6, 192)]
    assert {(r["task"], r["eval_dataset"]) for r in rows} == {("zeroshot_classification", "synthetic")}
    assert [r["metric"] for r in rows[:3]] == ["acc1", "acc5", "mean_per_class_recall"]
    for r in rows:
        assert r["compute_gmacs"] == pytest.approx(r["gmacs_per_sample"] * r["samples_seen"])
        assert r["model"] == "clipscale-tiny" and r["params"] > 0 and 0 <= r["value"] <= 1
    again = run_cli("eval", str(evaluated_run), "--device", "cpu")
    assert "0 new result rows" in again.stdout
    table = run_cli("results", str(evaluated_run), "--csv").stdout
    assert len(list(csv.DictReader(io.StringIO(table)))) == len(rows) == 9


def test_watch_evaluates_checkpoints_as_they_appear_until_the_last(evaluated_run, tmp_path):
    run = tmp_path / "ev"
    shutil.copytree(evaluated_run, run)
    (run / "results.jsonl").unlink()
    final = run / "checkpoints" / "step_000006"
    final.rename(tmp_path / "later")  # training has not got there yet, and it lives (this process stands for it)
    (run / "training.json").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    cmd = [sys.executable, "-m", "clipscale", "eval", str(run), "--watch", "--poll-s", "0.5", "--device", "cpu"]
    watcher = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while len(read_rows(run)) < 6 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert watcher.poll() is None, "the watcher stopped before the final checkpoint"
        (tmp_path / "later").rename(final)
        stdout, stderr = watcher.communicate(timeout=300)
    finally:
        watcher.kill()
    assert watcher.returncode == 0, stderr[-3000:]
    assert sorted({r["step"] for r in json_rows(run / "results.jsonl")}) == [2, 4, 6]
    assert "9 new result rows" in stdout


def test_eval_on_two_ranks_writes_what_one_process_writes(evaluated_run, tmp_path):
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    ckpt = evaluated_run / "checkpoints" / "step_000006"
    run_cli("export", str(ckpt), "--out", str(tmp_path / "exported"))
    data = json.loads((evaluated_run / "config.json").read_text())["eval"]["datasets"][0]
    for out, nproc in ((one, 1), (two, 2)):
        run_cli("eval", str(tmp_path / "exported"), "--data", data, "--out", str(out), "--tasks", "zeroshot",
                "--device", "cpu", nproc=nproc)
    assert [r["value"] for r in json_rows(one)] == pytest.approx([r["value"] for r in json_rows(two)], abs=1e-9)
    row = json_rows(one)[0]  # the export's provenance: the rows are those of the run's checkpoint
    assert (row["run"], row["checkpoint"], row["model"], row["samples_seen"]) == (
        "ev", "step_000006", "clipscale-tiny", 192)


class Samples(list):
    """(image, label) pairs that can carry CLIP_benchmark's `classes` attribute."""


def clip_benchmark_metrics(model_dir: Path, zeroshot_dir: Path) -> dict[str, float]:
    """CLIP_benchmark 1.6.2's zero-shot evaluation, in-process, on the open_clip model in `model_dir`."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{model_dir}")
    samples = []
    for shard in sorted((zeroshot_dir / "test").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(n for n in members if n.endswith(".jpg")):
            image = Image.open(io.BytesIO(members[name])).convert("RGB")
            samples.append((preprocess(image), int(members[name.replace(".jpg", ".cls")])))
    dataset = Samples(samples)
    dataset.classes = (zeroshot_dir / "classnames.txt").read_text().splitlines()  # CLIP_benchmark reads it here
    loader = torch.utils.data.DataLoader(dataset, batch_size=64)
    templates = (zeroshot_dir / "zeroshot_classification_templates.txt").read_text().splitlines()
    return cb.evaluate(model.eval(), loader, tokenizer, loader.dataset.classes, templates, "cpu", amp=False)


def numpy2_accuracy(output, target, topk=(1,)):
    """CLIP_benchmark 1.6.2's `accuracy` with `.item()` where it calls float() on a 1-element array,
    which numpy 2 refuses."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def test_agrees_with_clip_benchmark_on_an_exported_model(evaluated_run, synthetic_data, tmp_path, monkeypatch):
    run_cli("export", str(evaluated_run), "--out", str(tmp_path / "model"))
    ours = tmp_path / "ours.jsonl"
    run_cli("eval", str(tmp_path / "model"), "--data", f"synthetic={synthetic_data['zeroshot']}", "--out", str(ours),
            "--tasks", "zeroshot", "--device", "cpu")
    monkeypatch.setattr(cb, "accuracy", numpy2_accuracy)
    theirs = clip_benchmark_metrics(tmp_path / "model", Path(synthetic_data["zeroshot"]))
    got = {r["metric"]: r["value"] for r in json_rows(ours)}
    assert got.keys() == theirs.keys() == {"acc1", "acc5", "mean_per_class_recall"}
    for metric, value in theirs.items():
        assert abs(got[metric] - value) * 100 <= 0.3, (metric, got[metric], value)
    assert np.isfinite(list(theirs.values())).all()

    # The same weights as a published model: an architecture name + a local weights file.
    published = tmp_path / "published.jsonl"
    run_cli("eval", "--model", "clipscale-tiny", "--pretrained", str(tmp_path / "model" / "open_clip_pytorch_model.bin"),
            "--name", "tiny-release", "--dataset", "synthetic-train", "--data", f"synthetic={synthetic_data['zeroshot']}",
            "--out", str(published), "--tasks", "zeroshot", "--device", "cpu")
    rows = json_rows(published)
    assert [r["value"] for r in rows] == pytest.approx([got[r["metric"]] for r in rows], abs=1e-9)
    assert {(r["run"], r["model"], r["dataset"], r["step"]) for r in rows} == {
        ("tiny-release", "clipscale-tiny", "synthetic-train", None)}


def test_cli_errors_name_the_problem(evaluated_run, synthetic_data, tmp_path):
    bad = run_cli("eval", str(tmp_path), check=False)
    assert bad.returncode == 2 and "is neither a run directory (config.json), a checkpoint" in bad.stderr
    bad = run_cli("eval", str(evaluated_run), "--data", "nonsense", check=False)
    assert bad.returncode == 2 and "'nonsense' must look like NAME=PATH" in bad.stderr
    shutil.copytree(synthetic_data["zeroshot"], tmp_path / "nonames")
    (tmp_path / "nonames" / "classnames.txt").unlink()
    bad = run_cli("eval", str(evaluated_run), "--data", f"s={tmp_path / 'nonames'}", "--tasks", "zeroshot", check=False)
    assert bad.returncode == 2 and "nonames/classnames.txt is missing, so s is read as a retrieval set" in bad.stderr
    bad = run_cli("eval", str(evaluated_run), "--data", f"s={tmp_path / 'nonames'}", check=False)
    assert bad.returncode == 2 and "it has a class index, so the set lacks classnames.txt" in bad.stderr
    bad = run_cli("eval", "--model", "ViT-B-32", "--pretrained", str(tmp_path / "none.bin"), "--out",
                  str(tmp_path / "x.jsonl"), "--data", f"s={synthetic_data['zeroshot']}", check=False)
    assert bad.returncode == 2 and "none.bin is not a file (weights are never downloaded)" in bad.stderr
