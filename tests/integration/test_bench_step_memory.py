import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, run_cli

pytestmark = pytest.mark.slow


def test_bench_step_writes_json(tmp_path):
    out = tmp_path / "step.json"
    run_cli("bench", "step", "recipes/tiny_cpu.toml", "train.global_batch_size=16", "--steps", "2",
            "--warmup", "1", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["samples_per_s"] > 0 and result["global_batch_size"] == 16
    assert result["mfu"] is None  # no known peak on CPU: MFU is not invented


def run_benchmark(module: str, *args: str) -> None:
    """`python -m benchmarks.MODULE ARGS` from the repository root, as documented."""
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-6000:]


def test_bench_loss_writes_json(tmp_path):
    out = tmp_path / "loss.json"
    run_benchmark("loss", "--batches", "64", "128", "--dim", "16", "--tile-size", "32", "--repeats", "1",
            "--out", str(out))
    result = json.loads(out.read_text())
    assert {(r["batch"], r["tiled"]) for r in result["results"]} == {(64, True), (64, False), (128, True), (128, False)}
    assert all(r["time_s"] > 0 and r["extra_peak_mib"] >= 0 for r in result["results"])
    assert [s["batch"] for s in result["summary"]] == [64, 128]


def test_bench_gradcache_writes_json(tmp_path):
    out = tmp_path / "gradcache.json"
    run_benchmark("gradcache", "--time-batch", "8", "--batches", "8", "16", "--chunk-size", "4", "--steps", "1",
            "--width", "32", "--layers", "1", "--embed-dim", "16", "--image-size", "16", "--patch-size", "8",
            "--context-length", "8", "--out", str(out))
    result = json.loads(out.read_text())
    timing = result["timing"]
    assert all(timing[f"{mode}_s"] > 0 for mode in ("plain", "accumulate", "gradcache", "forward"))
    assert timing["ideal_ratio"] > 1
    assert {(r["mode"], r["batch"]) for r in result["memory"]} == {(m, b) for m in ("gradcache", "plain") for b in (8, 16)}
    assert all(r["extra_tensor_peak_mib"] > 0 for r in result["memory"])
    assert set(result["summary"]) == {"gradcache", "plain"}
