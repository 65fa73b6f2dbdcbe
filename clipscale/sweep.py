"""`clipscale sweep`: a recipe's `[sweep]` grid as one SLURM job array plus a chained eval job.

    clipscale sweep recipes/scaling_tiny.toml data.train_shards=... --dry-run
    clipscale sweep recipes/scaling_tiny.toml data.train_shards=... --sbatch-args="--gpus-per-node=1"

Grid points come from `clipscale.config.load_sweep`, the expansion the local demo uses too. Array
task i trains grid point i with slurm/train.sbatch, which reads its `clipscale train` arguments
from `<output_dir>/sweep-<name>/i.args` (one per line). A point whose run already holds its final
checkpoint is left out, so submitting again finishes an interrupted sweep: unfinished points
resume from their latest checkpoint. One eval job, `afterok` on the array, evaluates every point.
"""
from __future__ import annotations

import dataclasses
import shlex
import subprocess
from pathlib import Path

from clipscale.config import SWEEP_POINT, Config, load_config, load_sweep
from clipscale.errors import InputError

SCRIPTS = Path(__file__).resolve().parents[1] / "slurm"


class SweepError(InputError):
    """The sweep cannot be submitted (no scripts, no sbatch, a refused job); the message says why."""


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    """One grid point: its array index, `clipscale train` arguments and whether it is done."""

    index: int
    args: tuple[str, ...]
    run_dir: Path
    finished: bool


def sweep_points(recipe: str | Path, overrides: list[str]) -> list[SweepPoint]:
    """The grid of `recipe`, each point with `overrides` (data paths, output_dir) applied last."""
    points = []
    for index, (_, point_overrides) in enumerate(load_sweep(recipe, overrides)):
        args = (str(recipe), *point_overrides, *overrides)
        cfg = load_config(recipe, args[1:])
        points.append(SweepPoint(index=index, args=args, run_dir=cfg.run_dir.resolve(), finished=finished(cfg)))
    return points


def finished(cfg: Config) -> bool:
    """Whether the run's latest complete checkpoint is its last step."""
    from clipscale.checkpoint import latest_checkpoint, read_meta  # torch: only when sweeping

    latest = latest_checkpoint(cfg.run_dir / "checkpoints")
    return latest is not None and read_meta(latest)["step"] >= cfg.train.total_samples // cfg.train.global_batch_size


def sbatch_commands(points: list[SweepPoint], *, args_dir: Path, scripts: Path, sbatch_args: list[str],
                    eval_sbatch_args: list[str], eval_args: list[str]) -> tuple[list[str] | None, list[str]]:
    """The `sbatch` commands: the array of unfinished points (None when all are done) and the
    eval job over every point's run directory (its dependency on the array is added on submission)."""
    todo = [str(p.index) for p in points if not p.finished]
    train = None
    if todo:
        train = ["sbatch", "--parsable", f"--array={','.join(todo)}", f"--export=ALL,CLIPSCALE_ARGS_DIR={args_dir}",
                 *sbatch_args, str(scripts / "train.sbatch")]
    evaluate = ["sbatch", "--parsable", *eval_sbatch_args, str(scripts / "eval.sbatch"), *eval_args,
                *(str(p.run_dir) for p in points)]
    return train, evaluate


def write_args(points: list[SweepPoint], args_dir: Path) -> None:
    """Write each point's `clipscale train` arguments, one per line, for slurm/train.sbatch."""
    args_dir.mkdir(parents=True, exist_ok=True)
    for p in points:
        (args_dir / f"{p.index}.args").write_text("".join(f"{a}\n" for a in p.args))


def run_sweep(recipe: str | Path, overrides: list[str], *, dry_run: bool = False, scripts: Path | None = None,
              sbatch_args: list[str] = (), eval_sbatch_args: list[str] = (), eval_args: list[str] = ()) -> None:
    """Submit the sweep (with `dry_run`, print the commands as runnable shell lines instead).

    The arguments files are written either way, so the printed commands work as they are.
    `scripts` is the folder of train.sbatch and eval.sbatch (default: clipscale's slurm/).
    """
    scripts = Path(scripts or SCRIPTS).resolve()
    if not (scripts / "train.sbatch").is_file():
        raise SweepError(f"{scripts / 'train.sbatch'} not found; pass --scripts, clipscale's slurm/ folder")
    points = sweep_points(recipe, overrides)
    base = load_config(recipe, [SWEEP_POINT, *overrides])  # the grid's base run: its name and output dir
    args_dir = (Path(base.run.output_dir) / f"sweep-{base.run.name}").resolve()
    write_args(points, args_dir)
    for p in points:
        print(f"# point {p.index}: {p.run_dir} ({'finished, skipped' if p.finished else 'to train'})")
    train, evaluate = sbatch_commands(points, args_dir=args_dir, scripts=scripts, sbatch_args=list(sbatch_args),
                                      eval_sbatch_args=list(eval_sbatch_args), eval_args=list(eval_args))
    if dry_run:
        if train:
            print(f"array_job=$({shlex.join(train)})")
        dependency = ' --dependency=afterok:"$array_job"' if train else ""
        print(f"sbatch --parsable{dependency} {shlex.join(evaluate[2:])}")
        return
    if train:
        array_job = _sbatch(train)
        print(f"submitted array job {array_job}: points {train[2].split('=', 1)[1]}")
        evaluate.insert(2, f"--dependency=afterok:{array_job}")
    print(f"submitted eval job {_sbatch(evaluate)}")


def _sbatch(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise SweepError("sbatch not found: submit from a SLURM login node, or print the commands with --dry-run")
    if proc.returncode != 0:
        raise SweepError(f"{shlex.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]  # --parsable: JOBID[;CLUSTER]
