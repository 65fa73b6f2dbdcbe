"""The cases of `benchmarks/gpu.sh` (`python -m benchmarks.gpu`): the GPU profile asks for the
figures the script promises, and the same entry points run at toy sizes on CPU (gpu.sh itself needs
a GPU and is not run here)."""
import itertools
import json
import os
import subprocess
import sys

import pytest

from benchmarks import gpu
from tests.helpers import REPO

STEP_CASES = [f"step_{p}_ckpt_{c}" for p, c in itertools.product(("ddp", "fsdp"), ("off", "on"))]
CASES = [*STEP_CASES, "gradcache", "loss", "shards", "loader_cpu_decode", "loader_gpu_decode"]


def option(argv: list[str], name: str) -> list[str]:
    """The values after `name` in an argv, up to the next option."""
    values = argv[argv.index(name) + 1:]
    return list(itertools.takewhile(lambda v: not v.startswith("--"), values))


def test_gpu_profile_measures_what_the_script_promises(tmp_path):
    cases = dict(gpu.cases(gpu.PROFILES["gpu"], device="cuda", out=tmp_path))
    assert list(cases) == CASES
    for name in STEP_CASES:
        argv = cases[name]
        assert "recipes/vit_b16_gpu.toml" in argv and "train.precision=bf16" in argv and "run.device=cuda" in argv
        parallel, ckpt = name.split("_")[1], name.endswith("on")
        assert f"train.parallel={parallel}" in argv and f"train.grad_checkpointing={str(ckpt).lower()}" in argv
    gradcache = cases["gradcache"]
    assert int(option(gradcache, "--time-batch")[0]) == 8 * int(option(gradcache, "--chunk-size")[0])
    loss = cases["loss"]
    assert [int(b) for b in option(loss, "--batches")] == [32768, 65536]
    assert int(option(loss, "--dense-max-batch")[0]) >= 65536  # dense runs at 64k too: the comparison
    assert "data.decode_device=cuda" in cases["loader_gpu_decode"]
    script = REPO / "benchmarks" / "gpu.sh"
    assert "-m benchmarks.gpu --profile gpu --device cuda" in script.read_text() and os.access(script, os.X_OK)


def test_spent_budget_skips_cases_and_still_writes_the_summary(tmp_path):
    assert gpu.main(["--profile", "tiny", "--device", "cpu", "--budget-s", "0", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["cases"]) == CASES
    assert all("--budget-s 0 spent" in record["skipped"] for record in summary["cases"].values())


@pytest.mark.slow
def test_tiny_profile_runs_every_case_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu", "--profile", "tiny", "--device", "cpu",
                           "--budget-s", "3000", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=3000, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    cases = json.loads((tmp_path / "summary.json").read_text())["cases"]
    assert list(cases) == CASES
    for name in CASES[:-1]:
        assert cases[name]["returncode"] == 0, (name, cases[name].get("error"))
    for name in STEP_CASES:
        step = json.loads((tmp_path / f"{name}.json").read_text())
        assert step["precision"] == "bf16" and step["parallel"] == name.split("_")[1]
        assert step["grad_checkpointing"] == name.endswith("on")
        result = cases[name]["result"]
        assert result["step_time_s"] == pytest.approx(result["global_batch_size"] / result["samples_per_s"])
        assert result["mfu"] is None  # no known peak on CPU
    assert cases["gradcache"]["result"]["batch"] == 8 * cases["gradcache"]["result"]["chunk_size"]
    assert [s["batch"] for s in cases["loss"]["result"]["summary"]] == [64, 128]  # tiled and dense at each
    assert cases["loader_cpu_decode"]["result"]["samples_per_s"] > 0
    assert "result" in cases["loader_gpu_decode"] or cases["loader_gpu_decode"]["unavailable"]
