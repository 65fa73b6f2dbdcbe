"""A wheel installed into a fresh virtual environment runs the README commands that need no repository:
`plan` of a shipped recipe by name, `sweep --dry-run` with the shipped slurm/ scripts, `data synth`."""
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow
NOT_SOURCE = {".git", ".venv", "runs", "data", "build", "wandb", "bench_out"}  # at the top of the repository


def not_source(directory: str, names: list[str]) -> set[str]:
    top = NOT_SOURCE if Path(directory) == REPO else set()
    return {n for n in names if n in top or n == "__pycache__" or n.endswith(".egg-info")}


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    """A new venv holding only the clipscale wheel; the dependencies come from this interpreter's
    site-packages through a .pth path line (which does not run that directory's .pth files, so an
    editable clipscale there stays invisible)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy: building writes build/ and *.egg-info into the tree
    shutil.copytree(REPO, source, symlinks=True, ignore=not_source)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"),
         str(source)], cwd=tmp)
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
         *map(str, (tmp / "dist").glob("clipscale-*.whl"))], cwd=tmp)
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).strip()
    Path(purelib, "dependencies.pth").write_text("".join(f"{p}\n" for p in site.getsitepackages()))
    return venv


def test_installed_wheel_runs_outside_the_repository(fresh_venv, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    clipscale = str(fresh_venv / "bin" / "clipscale")
    where = run([str(fresh_venv / "bin" / "python"), "-c", "import clipscale; print(clipscale.__file__)"], tmp_path, env)
    assert Path(where.strip()).is_relative_to(fresh_venv), where

    plan = run([clipscale, "plan", "vit_g14_laion2b", "--gpus", "1480", "--gpu-mem", "40"], tmp_path, env)
    assert "ViT-g-14 on 1480 GPUs" in plan and "(run.accelerator=A100)" in plan

    sweep = run([clipscale, "sweep", "scaling_tiny", "--dry-run", f'run.output_dir="{tmp_path / "runs"}"'],
                tmp_path, env)
    assert str(fresh_venv) in sweep and "slurm/train.sbatch" in sweep and "array_job=$(sbatch" in sweep
    assert list(tmp_path.iterdir()) == []  # nothing written by plan or the dry run

    synth = run([clipscale, "data", "synth", "synthetic", "--train-samples", "256", "--samples-per-shard", "128",
                 "--zeroshot-samples", "60", "--processes", "1"], tmp_path, env)
    assert (tmp_path / "synthetic" / "train").is_dir(), synth
