"""The `clipscale` command: train, eval, sweep, fit, data, demo, export, bench."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import shlex
import sys
from pathlib import Path

from clipscale.config import ConfigError
from clipscale.data.shards import DataError
from clipscale.scaling.fit import FitError
from clipscale.sweep import SweepError

BENCHMARKS = ("loader", "loss", "gradcache", "step")


def _setup_logging() -> None:
    from clipscale.dist import launch_env

    rank = launch_env().rank
    logging.basicConfig(
        level=logging.WARNING,  # libraries' info chatter (open_clip logs to the root logger) stays quiet
        format=f"%(asctime)s %(levelname)s [rank{rank}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    logging.getLogger("clipscale").setLevel(logging.INFO if rank == 0 else logging.WARNING)
    # clipscale builds models without hub weights and loads its own (checkpoint or model.pretrained).
    logging.getLogger().handlers[0].addFilter(
        lambda record: not record.getMessage().startswith("No pretrained weights loaded"))


def cmd_train(args: argparse.Namespace) -> int:
    from clipscale.config import load_config, validate_for_world
    from clipscale.dist import launch_env
    from clipscale.train import EXIT_PREEMPTED, PREEMPTED_MARKER, Preempted, train

    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe and not recipe.endswith(".toml"):
        recipe, overrides = None, [recipe, *overrides]  # no recipe: the first word is an override
    cfg = load_config(recipe, overrides)
    if args.print_run_dir:
        print(cfg.run_dir.resolve())
        return 0
    launch = launch_env()
    validate_for_world(cfg, launch.world_size)  # before any process group
    marker = cfg.run_dir / PREEMPTED_MARKER
    if launch.rank == 0:
        marker.unlink(missing_ok=True)
    try:
        run_dir = train(cfg)
    except Preempted:
        if launch.rank == 0:  # tells slurm/train.sbatch to requeue: torchrun's exit code would not
            marker.write_text(f"{EXIT_PREEMPTED}\n")
        raise
    if launch.rank == 0:
        print(f"run directory: {run_dir}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from clipscale.evaluate.runner import evaluate_run

    for run_dir in args.run_dirs:
        records = evaluate_run(run_dir, zeroshot_dir=args.zeroshot_dir, device=args.device)
        for r in records:
            print(f"{r['run']} {r['checkpoint']} samples={r['samples_seen']} zeroshot_top1={r['zeroshot_top1']:.4f}")
        print(f"results: {Path(run_dir) / 'results.jsonl'} ({len(records)} new)")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from clipscale.sweep import run_sweep

    run_sweep(args.recipe, list(args.overrides), dry_run=args.dry_run, scripts=args.scripts,
              sbatch_args=shlex.split(args.sbatch_args), eval_sbatch_args=shlex.split(args.eval_sbatch_args),
              eval_args=shlex.split(args.eval_args))
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from clipscale.scaling.fit import fit_results

    fits = fit_results(args.results, metric=args.metric, x=args.x, out_dir=args.out, checkpoints=args.checkpoints)
    print(f"fit: {fits['formula']}")
    print(f"fits: {Path(args.out) / 'fits.json'}  plot: {Path(args.out) / 'fit.png'}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from clipscale.data.synthetic import write_synthetic_dataset

    specs = write_synthetic_dataset(args.out, train_samples=args.train_samples, seed=args.seed,
                                    processes=args.processes)
    for name, spec in specs.items():
        print(f"{name}: {spec}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from clipscale.demo import run_demo

    run_demo(out=Path(args.out), recipe=Path(args.recipe), nproc=args.nproc)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from clipscale.checkpoint import export_open_clip

    weights = export_open_clip(args.checkpoint, args.out)
    print(f"weights: {weights}\nload with: open_clip.create_model('local-dir:{weights.parent}')")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"clipscale.bench.{args.name}")
    return module.main(args.bench_args) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipscale", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (under torchrun for several processes)")
    p.add_argument("recipe", nargs="?", help="recipe TOML (default: the embedded tiny CPU run)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.global_batch_size=512")
    p.add_argument("--print-run-dir", action="store_true",
                   help="print the run directory the recipe and overrides resolve to, and exit")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="zero-shot evaluate every checkpoint of run directories")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--zeroshot-dir", help="zero-shot set (default: the run config's eval.zeroshot_dir)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("sweep", help="submit a recipe's [sweep] grid as a SLURM job array, eval chained")
    p.add_argument("recipe", help="recipe TOML with a [sweep] table")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every point, e.g. data.train_shards=...")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch commands instead of submitting them")
    p.add_argument("--sbatch-args", default="",
                   help='sbatch options of the training array, e.g. "--nodes=2 --gpus-per-node=8"')
    p.add_argument("--eval-sbatch-args", default="", help="sbatch options of the eval job")
    p.add_argument("--eval-args", default="", help="options slurm/eval.sbatch passes to `clipscale eval`")
    p.add_argument("--scripts", help="folder holding train.sbatch and eval.sbatch (default: clipscale's slurm/)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("fit", help="fit a power law to evaluation results")
    p.add_argument("results", nargs="+", help="results.jsonl files or run directories")
    p.add_argument("--metric", default="zeroshot_top1")
    p.add_argument("--x", default="train_compute_gmacs", help="compute axis field")
    p.add_argument("--out", default="fits", help="output directory for fits.json and fit.png")
    p.add_argument("--checkpoints", choices=("final", "all"), default="final",
                   help="fit each run's final checkpoint (default) or every checkpoint")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("data", help="write the synthetic dataset (train shards + zero-shot set)")
    p.add_argument("out")
    p.add_argument("--train-samples", type=int, default=64_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("demo", help="synthetic data -> scaling grid under torchrun -> eval -> fit")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--recipe", default=str(Path(__file__).resolve().parents[1] / "recipes" / "scaling_tiny.toml"))
    p.add_argument("--nproc", type=int, default=2, help="processes per run (torchrun)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export", help="export a checkpoint as an open_clip model directory")
    p.add_argument("checkpoint", help="checkpoint directory, or a run directory (its latest checkpoint)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("bench", help=f"benchmarks writing JSON: {', '.join(BENCHMARKS)}")
    p.add_argument("name", choices=BENCHMARKS)
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, FitError, SweepError) as e:
        print(f"clipscale: error: {e}", file=sys.stderr)
        return 2
