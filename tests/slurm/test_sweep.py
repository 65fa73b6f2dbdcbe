"""`clipscale sweep --dry-run`: the grid shared with the demo, as sbatch commands (no SLURM needed)."""
import os
import shlex
import subprocess
import sys

from clipscale.config import load_sweep
from tests.helpers import REPO

RECIPE = REPO / "recipes" / "scaling_tiny.toml"


def sweep(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipscale", "sweep", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env)


def test_dry_run_prints_one_array_task_per_point_and_a_chained_eval(tmp_path):
    proc = sweep(str(RECIPE), f'run.output_dir="{tmp_path}"', "--dry-run", "--sbatch-args=--gpus-per-node=1",
                 "--eval-args=--device cuda")
    assert proc.returncode == 0, proc.stderr
    points = load_sweep(RECIPE)  # what the local demo trains, in the same order
    lines = proc.stdout.splitlines()
    array = next(line for line in lines if line.startswith("array_job=$("))
    assert f"--array={','.join(str(i) for i in range(len(points)))}" in array and "--gpus-per-node=1" in array
    assert array.endswith(f"{REPO / 'slurm' / 'train.sbatch'})")
    evaluate = shlex.split(lines[-1])
    assert evaluate[:3] == ["sbatch", "--parsable", "--dependency=afterok:$array_job"]
    assert evaluate[4:6] == ["--device", "cuda"]
    assert evaluate[6:] == [str(tmp_path.resolve() / name) for name, _ in points]
    args_dir = tmp_path.resolve() / "sweep-scaling_tiny"
    assert f"CLIPSCALE_ARGS_DIR={args_dir}" in array
    assert not args_dir.exists()  # a dry run writes nothing: it prints the arguments files as shell lines
    for i, (name, overrides) in enumerate(points):  # what train.sbatch hands to `clipscale train`
        heredoc = proc.stdout.split(f"cat > {args_dir / f'{i}.args'} <<'EOF'\n", 1)[1].split("EOF\n", 1)[0]
        assert heredoc.splitlines() == [str(RECIPE), *overrides, f'run.output_dir="{tmp_path}"']


def test_missing_scripts_folder_is_named(tmp_path):
    proc = sweep(str(RECIPE), "--dry-run", f"--scripts={tmp_path}")
    assert proc.returncode == 2
    assert f"{tmp_path / 'train.sbatch'} not found" in proc.stderr


def test_recipe_without_a_grid_is_named(tmp_path):
    proc = sweep(str(REPO / "recipes" / "tiny_cpu.toml"), "--dry-run")
    assert proc.returncode == 2 and "no [sweep] table" in proc.stderr


def test_submitting_without_sbatch_is_named(tmp_path):
    proc = sweep(str(RECIPE), f'run.output_dir="{tmp_path}"', env={**os.environ, "PATH": str(tmp_path)})
    assert proc.returncode == 2 and "sbatch not found" in proc.stderr and "--dry-run" in proc.stderr
