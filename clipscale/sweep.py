"""`clipscale sweep`: a recipe's `[sweep]` grid as one SLURM job array plus a chained eval job, or
run on this machine with torchrun (`--local`, what the demo does).

    clipscale sweep recipes/scaling_tiny.toml data.train_shards=... --dry-run
    clipscale sweep recipes/scaling_tiny.toml data.train_shards=... --sbatch-args="--gpus-per-node=1"
    clipscale sweep recipes/scaling_tiny.toml data.train_shards=... --local --nproc 2 --parallel 1

Grid points come from `clipscale.config.load_sweep`. A point whose run already holds its final
checkpoint is left out, so starting the sweep again finishes an interrupted one: unfinished points
resume from their latest checkpoint. On SLURM, array task i trains grid point i with
slurm/train.sbatch, which reads its `clipscale train` arguments from `<output_dir>/sweep-<name>/i.args`
(one per line), and one eval job, `afterok` on the array, evaluates every point. Locally, each point
is one torchrun (`--parallel` at a time, its output in RUN/logs/torchrun.log), then every point is
evaluated in this process. `--dry-run` prints what would run and writes nothing.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import shlex
import subprocess
import sys
from pathlib import Path

from clipscale.config import SWEEP_POINT, Config, load_config, load_sweep, resolve_recipe
from clipscale.errors import InputError

SCRIPTS = Path(__file__).parent / "slurm"  # the repository's slurm/, linked into the package
LOCAL_LOG = "logs/torchrun.log"  # of a local point, in its run directory


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
    recipe = resolve_recipe(recipe)  # the arguments name the file, wherever the sweep starts from
    points = []
    for index, (_, point_overrides) in enumerate(load_sweep(recipe, overrides)):
        args = (str(recipe), *point_overrides, *overrides)
        cfg = load_config(recipe, args[1:])
        points.append(SweepPoint(index=index, args=args, run_dir=cfg.run_dir.resolve(), finished=finished(cfg)))
    return points


def finished(cfg: Config) -> bool:
    """Whether the run's latest complete checkpoint has seen `train.total_samples`."""
    if not (cfg.run_dir / "checkpoints").is_dir():  # a dry run of a new sweep needs no torch
        return False
    from clipscale.checkpoint import latest_checkpoint, read_meta

    latest = latest_checkpoint(cfg.run_dir / "checkpoints")
    return latest is not None and read_meta(latest)["samples_seen"] >= cfg.train.total_samples


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


def args_files(points: list[SweepPoint], args_dir: Path) -> dict[Path, str]:
    """Each point's `clipscale train` arguments file for slurm/train.sbatch: one argument per line."""
    return {args_dir / f"{p.index}.args": "".join(f"{a}\n" for a in p.args) for p in points}


def sweep_dir(recipe: str | Path, overrides: list[str]) -> Path:
    """`<output_dir>/sweep-<name>` of the grid's base run: the SLURM arguments files live there."""
    base = load_config(resolve_recipe(recipe), [SWEEP_POINT, *overrides])
    return (Path(base.run.output_dir) / f"sweep-{base.run.name}").resolve()


def print_points(points: list[SweepPoint]) -> None:
    for p in points:
        print(f"# point {p.index}: {p.run_dir} ({'finished, skipped' if p.finished else 'to train'})", flush=True)


def run_sweep(recipe: str | Path, overrides: list[str], *, dry_run: bool = False, scripts: Path | None = None,
              sbatch_args: list[str] = (), eval_sbatch_args: list[str] = (), eval_args: list[str] = ()) -> None:
    """Submit the sweep to SLURM (with `dry_run`, print runnable shell lines instead and write nothing).

    `scripts` is the folder of train.sbatch and eval.sbatch (default: clipscale's slurm/).
    """
    scripts = Path(scripts or SCRIPTS).resolve()
    if not (scripts / "train.sbatch").is_file():
        raise SweepError(f"{scripts / 'train.sbatch'} not found; pass --scripts, clipscale's slurm/ folder")
    points = sweep_points(recipe, overrides)
    args_dir = sweep_dir(recipe, overrides)
    files = args_files(points, args_dir)
    print_points(points)
    train, evaluate = sbatch_commands(points, args_dir=args_dir, scripts=scripts, sbatch_args=list(sbatch_args),
                                      eval_sbatch_args=list(eval_sbatch_args), eval_args=list(eval_args))
    if dry_run:
        print(f"mkdir -p {shlex.quote(str(args_dir))}")
        for path, text in files.items():
            print(f"cat > {shlex.quote(str(path))} <<'EOF'\n{text}EOF")
        if train:
            print(f"array_job=$({shlex.join(train)})")
        dependency = ' --dependency=afterok:"$array_job"' if train else ""
        print(f"sbatch --parsable{dependency} {shlex.join(evaluate[2:])}")
        return
    args_dir.mkdir(parents=True, exist_ok=True)
    for path, text in files.items():
        path.write_text(text)
    if train:
        array_job = _sbatch(train)
        print(f"submitted array job {array_job}: points {train[2].split('=', 1)[1]}")
        evaluate.insert(2, f"--dependency=afterok:{array_job}")
    print(f"submitted eval job {_sbatch(evaluate)}")


def torchrun_command(point: SweepPoint, *, nproc: int) -> list[str]:
    """The torchrun command training `point` on this machine (`--standalone`: a free port per run)."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
            "-m", "clipscale", "train", *point.args, "log.progress_bar=false"]


def _train_local(point: SweepPoint, *, nproc: int) -> int:
    log = point.run_dir / LOCAL_LOG
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[sweep] point {point.index}: training {point.run_dir.name} on {nproc} processes (log: {log})",
          flush=True)
    with open(log, "a") as out:
        code = subprocess.run(torchrun_command(point, nproc=nproc), stdout=out, stderr=subprocess.STDOUT).returncode
    print(f"[sweep] point {point.index}: {'done' if code == 0 else f'FAILED (exit {code})'}", flush=True)
    return code


def run_local(recipe: str | Path, overrides: list[str], *, nproc: int = 1, parallel: int = 1,
              dry_run: bool = False) -> list[Path]:
    """Train the grid's unfinished points with torchrun on this machine, `parallel` at a time, then
    evaluate every point on its `eval.datasets` (rows already in its results.jsonl are skipped).

    Returns the run directories; a failed point raises after the others have finished.
    """
    if nproc < 1 or parallel < 1:
        raise SweepError(f"--nproc {nproc} and --parallel {parallel} must be at least 1")
    points = sweep_points(recipe, overrides)
    print_points(points)
    todo = [p for p in points if not p.finished]
    if dry_run:
        for p in todo:
            print(shlex.join(torchrun_command(p, nproc=nproc)))
        return [p.run_dir for p in points]
    with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
        codes = list(pool.map(lambda p: _train_local(p, nproc=nproc), todo))
    failed = [p for p, code in zip(todo, codes) if code != 0]
    if failed:
        raise SweepError("training failed for " + ", ".join(f"point {p.index} (see {p.run_dir / LOCAL_LOG})"
                                                             for p in failed) + "; fix it and run the sweep again")
    evaluate_points(points)
    return [p.run_dir for p in points]


def evaluate_points(points: list[SweepPoint]) -> None:
    """The local sweep's chained evaluation: every point's checkpoints on its run's eval.datasets."""
    from clipscale.evaluate.runner import evaluate_run, run_config

    runs = [p.run_dir for p in points if run_config(p.run_dir).eval.datasets]
    for run_dir in runs:
        rows = evaluate_run(run_dir)
        print(f"[sweep] evaluated {run_dir.name}: {len(rows)} new result rows", flush=True)
    if len(runs) < len(points):
        print("[sweep] runs without eval.datasets were not evaluated: clipscale eval RUN --data NAME=PATH")
    print(f"[sweep] runs: {', '.join(str(p.run_dir) for p in points)}")
    if runs:
        print(f"[sweep] results: RUN/results.jsonl of each run; one table: clipscale results {' '.join(map(str, runs))}")


def _sbatch(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise SweepError("sbatch not found: submit from a SLURM login node, or print the commands with --dry-run")
    if proc.returncode != 0:
        raise SweepError(f"{shlex.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]  # --parsable: JOBID[;CLUSTER]
