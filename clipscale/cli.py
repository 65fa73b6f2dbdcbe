"""The `clipscale` command: train, eval, results, sweep, fit, predict, design, forecast, data, demo, plan, export,
bench."""
from __future__ import annotations

import argparse
import functools
import importlib
import logging
import shlex
import sys
from pathlib import Path

from clipscale.config import ConfigError
from clipscale.errors import InputError

BENCHMARKS = ("loader", "step")
PASSTHROUGH = ("data", "bench")  # verbs whose options their own parsers read


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help beside it with its default (when it has one), the description as written."""

    def __init__(self, prog: str, **kwargs) -> None:
        super().__init__(prog, **{"max_help_position": 44, **kwargs})

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        if default is None or default is False or default in ("", [], argparse.SUPPRESS) or "default" in text \
                or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def _setup_logging() -> None:
    from clipscale.launch import launch_env

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


def _recipe_and_overrides(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe and not recipe.endswith(".toml"):
        recipe, overrides = None, [recipe, *overrides]  # no recipe: the first word is an override
    return recipe, overrides


def cmd_train(args: argparse.Namespace) -> int:
    from clipscale.config import load_config, validate_for_world
    from clipscale.launch import launch_env

    launch = launch_env()
    try:  # every check that can fail before any process group, run directory or model exists
        cfg = load_config(*_recipe_and_overrides(args))
        if args.print_run_dir:  # every sbatch start asks this: no torch import
            print(cfg.run_dir.resolve())
            return 0
        from clipscale.data.pipeline import check_data

        validate_for_world(cfg, launch.world_size)
        check_data(cfg.data, global_batch_size=cfg.train.global_batch_size, world_size=launch.world_size)
    except InputError:
        if launch.rank != 0:
            return 2  # every rank ran the same checks: rank 0 alone reports the error
        raise
    from clipscale.train import train

    # on a signal it writes RUN/preempted, which slurm/train.sbatch requeues on
    run_dir = train(cfg, allow_config_change=args.allow_config_change)
    if launch.rank == 0:
        print(f"run directory: {run_dir}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from clipscale.dist import destroy_distributed, init_distributed
    from clipscale.evaluate.runner import evaluate_open_clip, evaluate_target, parse_tasks

    if bool(args.model) == bool(args.targets):
        raise ConfigError("pass run, checkpoint or exported directories, or --model ARCH --pretrained FILE")
    overrides = {k: v for k, v in (("datasets", tuple(args.data or ())), ("batch_size", args.batch_size),
                                   ("num_workers", args.workers), ("precision", args.precision)) if v}
    if args.tasks:
        overrides["tasks"] = parse_tasks(args.tasks.split(","))
    info = init_distributed(device=args.device)  # a process group only under torchrun
    try:
        if args.model:
            if args.out is None or not args.data:
                raise ConfigError("--model needs --out FILE.jsonl and at least one --data NAME=PATH")
            from clipscale.config import EvalConfig

            rows = evaluate_open_clip(args.model, pretrained=args.pretrained, out=args.out, run=args.name,
                                      dataset=args.dataset, cfg=EvalConfig(**overrides), device=args.device)
        else:
            rows = [r for t in args.targets for r in evaluate_target(
                t, overrides=overrides, device=args.device, out=args.out, poll_s=args.poll_s if args.watch else None,
                idle_timeout_s=args.idle_timeout_s)]
    finally:
        destroy_distributed()
    if info.is_main:
        for r in rows:
            print(f"{r['run']} {r['checkpoint']} {r['task']} {r['eval_dataset']} {r['metric']}={r['value']:.4f}")
        print(f"{len(rows)} new result rows")
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from clipscale.results import RESULTS, write_csv

    missing = [s for s in args.sources if not (Path(s).is_file() or (Path(s) / RESULTS).is_file())]
    if missing:
        raise ConfigError(f"no results at {missing}; evaluate first (clipscale eval RUN) or pass results.jsonl files")
    if args.csv in (None, "-"):
        write_csv(args.sources, sys.stdout)
    else:
        with open(args.csv, "w", newline="") as f:
            count = write_csv(args.sources, f)
        print(f"{count} rows -> {args.csv}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from clipscale.sweep import run_local, run_sweep

    if args.local:
        run_local(args.recipe, list(args.overrides), nproc=args.nproc, parallel=args.parallel, dry_run=args.dry_run)
        return 0
    run_sweep(args.recipe, list(args.overrides), dry_run=args.dry_run, scripts=args.scripts,
              sbatch_args=shlex.split(args.sbatch_args), eval_sbatch_args=shlex.split(args.eval_sbatch_args),
              eval_args=shlex.split(args.eval_args))
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from clipscale.scaling import fit_results, format_fits

    fits = fit_results(args.results, out_dir=args.out, metric=args.metric, eval_dataset=args.eval_dataset,
                       task=args.task, x=args.x, form=args.form, frontier=args.frontier, by=args.by,
                       holdout=args.holdout, checkpoints=args.checkpoints, error=args.error, eval_hash=args.eval_hash,
                       n_bootstrap=args.bootstrap)
    print(format_fits(fits))
    print(f"fits: {Path(args.out) / 'fits.json'}  plots: {Path(args.out)}/fit_*.png, .pdf")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from clipscale.scaling import format_plan, read_fits

    print(format_plan(read_fits(args.fits), args.budget))
    return 0


def _one_fit(args: argparse.Namespace, *, form: str):
    """The single law a design or forecast works with: from --fits, or fitted to the results given."""
    from clipscale.scaling import FitError, fit, load_results, read_fits

    if args.fits:
        fits = read_fits(args.fits)
    else:
        fits = fit(load_results(args.results), metric=args.metric, eval_dataset=args.eval_dataset, task=args.task,
                   form=form, frontier=getattr(args, "frontier", None))
    if len(fits) != 1:
        raise FitError(f"{len(fits)} fits (groups {[f.group for f in fits]}); design and forecast need one law: "
                       f"pass results of one group, or a fits.json fitted without --by")
    return fits[0]


def cmd_design(args: argparse.Namespace) -> int:
    import json

    from matplotlib.figure import Figure

    from clipscale.scaling import FitError, design
    from clipscale.scaling.design import candidates_from_recipe, parse_candidate

    if not args.results and not args.fits:
        raise FitError("design needs results (files, run directories, globs) or --fits fits.json")
    if not args.candidate and not args.recipe:
        raise FitError("design needs candidates: --recipe GRID.toml with a [sweep] grid, or "
                       "--candidate model=...,samples=...")
    cost = dict(unit=args.budget_unit, peak_tflops=args.peak_tflops, mfu=args.mfu)
    if args.candidate:
        candidates = [parse_candidate(spec, args.recipe, **cost) for spec in args.candidate]
    else:
        candidates = candidates_from_recipe(args.recipe, **cost)
    f = _one_fit(args, form=args.form)
    d = design(f, target=args.target, candidates=candidates, budget=args.budget, budget_unit=args.budget_unit,
               seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "design.toml").write_text(d.recipe(args.recipe))
    (out / "design.json").write_text(json.dumps(d.to_dict(), indent=1) + "\n")
    fig = Figure(figsize=(6, 4), dpi=120)
    d.plot(fig.subplots())
    fig.tight_layout()
    fig.savefig(out / "design.png")
    print(d.table())
    print(f"recipe: {out / 'design.toml'} (train with `clipscale sweep {out / 'design.toml'} ...`)  "
          f"table: {out / 'design.json'}  plot: {out / 'design.png'}")
    return 0


def cmd_forecast(args: argparse.Namespace) -> int:
    import time

    from clipscale.scaling import FitError, forecast

    law = _one_fit(args, form=args.form) if args.fits else None
    seen = None
    while True:
        try:
            fc = forecast(args.run, grid=args.grid, metric=args.metric, eval_dataset=args.eval_dataset,
                          task=args.task, form=args.form, law=law)
        except FitError as e:
            if not args.watch:
                raise
            fc, message = None, f"waiting: {e}"
            if message != seen:
                print(message, flush=True)
                seen = message
        if fc is not None and len(fc.observed) != seen:
            seen = len(fc.observed)
            print(("" if fc.on_law else "FLAG ") + fc.summary(), flush=True)
            for note in fc.notes:
                print(f"  note: {note}")
            if args.plot:
                from matplotlib.figure import Figure

                fig = Figure(figsize=(6, 4), dpi=120)
                fc.plot(fig.subplots())
                fig.tight_layout()
                fig.savefig(args.plot)
        if not args.watch or (fc is not None and fc.samples_seen >= fc.total_samples):
            return 0
        time.sleep(args.poll_s)


def cmd_data(args: argparse.Namespace) -> int:
    from clipscale.data_tools.cli import main as data_main

    return data_main(args.data_args)


def cmd_demo(args: argparse.Namespace) -> int:
    from clipscale.demo import run_demo

    run_demo(out=Path(args.out), recipe=args.recipe, nproc=args.nproc)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from clipscale.config import load_config
    from clipscale.plan import format_plan, plan

    cfg = load_config(*_recipe_and_overrides(args))
    budget = plan(cfg, gpus=args.gpus, gpu_mem_gib=args.gpu_mem, peak_tflops=args.peak_tflops, mfu=args.mfu)
    print(format_plan(budget))
    if args.out:
        Path(args.out).write_text(json.dumps(budget, indent=2) + "\n")
        print(f"plan: {args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from clipscale.export import export_open_clip, export_timm

    if args.format == "open_clip":
        out = export_open_clip(args.checkpoint, args.out)
        print(f"open_clip directory: {out}\nload with: open_clip.create_model('local-dir:{out}') "
              f"(or upload it and use 'hf-hub:ORG/NAME')")
    else:
        out = export_timm(args.checkpoint, args.out)
        print(f"timm image tower: {out}\nload with: timm.create_model('local-dir:{out}', pretrained=True) "
              f"(num_classes=0 for the pooled embedding)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"clipscale.bench.{args.name}")
    return module.main(args.bench_args) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipscale", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    verb = functools.partial(sub.add_parser, formatter_class=HelpFormatter)

    p = verb("train", help="train a model (under torchrun for several processes)")
    p.add_argument("recipe", nargs="?", help="recipe TOML or shipped recipe name (default: the embedded tiny CPU run)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.global_batch_size=512")
    p.add_argument("--print-run-dir", action="store_true",
                   help="print the run directory the recipe and overrides resolve to, and exit")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume a run although its config changed in fields that change the trajectory "
                        "(the earlier config is kept as config.N.json)")
    p.set_defaults(func=cmd_train)

    p = verb("eval", help="zero-shot classification, retrieval, linear probe -> results.jsonl")
    p.add_argument("targets", nargs="*", help="run directories (every checkpoint), checkpoints or exported models")
    p.add_argument("--data", action="append", metavar="NAME=PATH",
                   help="evaluation set in CLIP_benchmark's layout, repeatable (default: each run's eval.datasets)")
    p.add_argument("--tasks", help="comma-separated zeroshot,retrieval,linear_probe,loss (default: eval.tasks)")
    p.add_argument("--model", help="open_clip architecture of published weights (with --pretrained FILE)")
    p.add_argument("--pretrained", help="local open_clip weights file for --model")
    p.add_argument("--name", help="run name in the rows of --model weights (default: the weights file name)")
    p.add_argument("--dataset", default="unknown", help="upstream training data of --model weights")
    p.add_argument("--out", help="results file for models outside a run directory")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: this rank's GPU if any")
    p.add_argument("--batch-size", type=int, help="images per forward (default: eval.batch_size)")
    p.add_argument("--workers", type=int, help="image-decoding DataLoader workers per process (default: eval.num_workers)")
    p.add_argument("--precision", choices=("fp32", "bf16"), help="(default: eval.precision)")
    p.add_argument("--watch", action="store_true", help="evaluate checkpoints as they appear until the run's last")
    p.add_argument("--poll-s", type=float, default=60.0, help="--watch: seconds between looks for new checkpoints")
    p.add_argument("--idle-timeout-s", type=float, default=3600.0,
                   help="--watch: stop when nothing in the run (metrics, checkpoints) changed for this long; it also "
                        "stops when training exited or died on this host")
    p.set_defaults(func=cmd_eval)

    p = verb("results", help="flatten the results of many runs into one CSV")
    p.add_argument("sources", nargs="+", help="run directories or results.jsonl files")
    p.add_argument("--csv", nargs="?", const="-", default="-", help="CSV file to write (default: stdout)")
    p.set_defaults(func=cmd_results)

    p = verb("sweep", help="a recipe's [sweep] grid: a SLURM job array or torchrun here (--local), eval chained")
    p.add_argument("recipe", help="recipe TOML (or shipped recipe name) with a [sweep] table")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every point, e.g. data.train_shards=...")
    p.add_argument("--dry-run", action="store_true", help="print the commands instead of running them; writes nothing")
    p.add_argument("--local", action="store_true",
                   help="train the unfinished points with torchrun on this machine, then evaluate them")
    p.add_argument("--nproc", type=int, default=1, help="--local: processes per point (torchrun --nproc_per_node)")
    p.add_argument("--parallel", type=int, default=1, help="--local: points trained at the same time")
    p.add_argument("--sbatch-args", default="",
                   help='sbatch options of the training array, e.g. "--nodes=2 --gpus-per-node=8"')
    p.add_argument("--eval-sbatch-args", default="", help="sbatch options of the eval job")
    p.add_argument("--eval-args", default="", help="options slurm/eval.sbatch passes to `clipscale eval`")
    p.add_argument("--scripts", help="folder holding train.sbatch and eval.sbatch (default: clipscale's slurm/)")
    p.set_defaults(func=cmd_sweep)

    p = verb("fit", help="fit scaling laws to evaluation results, with bootstrap intervals")
    p.add_argument("results", nargs="+", help="results.jsonl / CSV files, run directories or globs")
    p.add_argument("--metric", required=True, help="e.g. acc1, image_retrieval_recall@5, loss")
    p.add_argument("--error", choices=("value", "1-value"),
                   help="what to fit: the metric as it is (value) or 1 - metric (default: 1-value for accuracies "
                        "and recalls, value for loss/*_loss/error/*_error; required for any other metric)")
    p.add_argument("--eval-dataset", help="e.g. imagenet1k (needed when the metric spans several)")
    p.add_argument("--task", help="zeroshot_classification | zeroshot_retrieval | linear_probe")
    p.add_argument("--x", default="compute_gmacs", choices=("compute_gmacs", "samples_seen", "params"),
                   help="axis: compute_gmacs = forward GMACs per pair x samples seen (Cherti et al. 2023)")
    p.add_argument("--form", default="power", choices=("power", "saturating", "nd"),
                   help="law: error = A*C^alpha, + E (saturating), or in params and data (nd)")
    p.add_argument("--frontier", help="none | strict | bins:K (default bins:5; none for nd)")
    p.add_argument("--by", default=[], type=lambda s: s.split(","), help="comma-separated columns: one fit each")
    p.add_argument("--holdout", type=int, default=0, help="fit without the K highest-x rows and check them")
    p.add_argument("--checkpoints", choices=("final", "all"), default="final",
                   help="fit each run's final checkpoint (default) or every checkpoint")
    p.add_argument("--eval-hash", help="prompt set to fit (a unique prefix is enough; default: the newest of each "
                   "task and eval dataset, with a note naming the others)")
    p.add_argument("--bootstrap", type=int, default=400, help="bootstrap replicates")
    p.add_argument("--out", default="fits", help="output directory for fits.json and the plots")
    p.set_defaults(func=cmd_fit)

    p = verb("predict", help="predicted error (and nd's compute-optimal split) at compute budgets")
    p.add_argument("fits", help="fits.json, or the directory holding it")
    p.add_argument("--budget", type=float, action="append", required=True, help="in the fit's x units; repeatable")
    p.set_defaults(func=cmd_predict)

    p = verb("design", help="the runs to train next that most narrow a law's prediction at a target")
    p.add_argument("results", nargs="*", help="results.jsonl / CSV files, run directories or globs (or --fits)")
    p.add_argument("--fits", help="fits.json of `clipscale fit` (one law) instead of results")
    p.add_argument("--metric", default="acc1", help="metric whose error the law predicts")
    p.add_argument("--eval-dataset", help="evaluation set to fit (default: the only one)")
    p.add_argument("--task", help="task to fit (default: the only one)")
    p.add_argument("--form", default="nd", choices=("power", "saturating", "nd"), help="the law's form")
    p.add_argument("--frontier", help="none | strict | bins:K (default bins:5; none for nd)")
    p.add_argument("--target", type=float, required=True,
                   help="compute_gmacs whose predicted error to sharpen (nd: at its compute-optimal allocation)")
    p.add_argument("--recipe", help="recipe whose [sweep] grid lists the candidates (and the base of the output)")
    p.add_argument("--candidate", action="append",
                   help="a candidate run model=NAME,samples=N[,dotted.key=VALUE...] (repeatable; replaces the grid)")
    p.add_argument("--budget", type=float, required=True, help="what the chosen runs may cost together")
    p.add_argument("--budget-unit", default="compute_gmacs", choices=("compute_gmacs", "gpu_hours"),
                   help="unit of --budget")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="gpu_hours: peak TFLOP/s per GPU (H100: 989)")
    p.add_argument("--mfu", type=float, default=0.4, help="gpu_hours: model FLOPs utilisation assumed")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated outcomes")
    p.add_argument("--out", default="design", help="directory for design.toml, design.json and design.png")
    p.set_defaults(func=cmd_design)

    p = verb("forecast", help="a training run's final error from its partial curves; on its grid's law?")
    p.add_argument("run", help="the run directory (config.json, metrics.jsonl, results.jsonl)")
    p.add_argument("--grid", nargs="+", required=True, help="the grid's run directories or globs (the run is left out)")
    p.add_argument("--fits", help="fits.json with the grid's law (default: fit --form to the grid's finished runs)")
    p.add_argument("--metric", default="acc1", help="metric whose final error is forecast")
    p.add_argument("--eval-dataset", help="evaluation set (default: the only one)")
    p.add_argument("--task", help="task (default: the only one)")
    p.add_argument("--form", default="nd", choices=("power", "saturating", "nd"), help="the grid's law")
    p.add_argument("--watch", action="store_true", help="a line per new evaluation until the run's last")
    p.add_argument("--poll-s", type=float, default=60.0, help="--watch: seconds between looks")
    p.add_argument("--plot", help="PNG of the forecast (rewritten on each new evaluation)")
    p.set_defaults(func=cmd_forecast)

    p = verb("data", help="prepare shards: sizes, make, validate, inspect, reshard, synth, eval-set",
                       add_help=False)
    p.add_argument("data_args", nargs=argparse.REMAINDER, help="`clipscale data --help` lists the verbs")
    p.set_defaults(func=cmd_data)

    p = verb("demo", help="synthetic data -> scaling grid under torchrun -> eval -> fit")
    p.add_argument("--out", default="runs/demo", help="directory for the data, runs and fit")
    p.add_argument("--recipe", default="scaling_tiny", help="sweep recipe TOML or shipped recipe name")
    p.add_argument("--nproc", type=int, default=2, help="processes per run (torchrun)")
    p.set_defaults(func=cmd_demo)

    p = verb("plan", help="compute, memory per GPU and time of a run, before running it")
    p.add_argument("recipe", nargs="?", help="recipe TOML or shipped recipe name (default: the embedded tiny CPU run)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.name=ViT-L-14")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs (world size)")
    p.add_argument("--gpu-mem", type=float, required=True, help="memory per GPU in GiB")
    p.add_argument("--peak-tflops", type=float,
                   help="peak dense 16-bit TFLOP/s per GPU (default: that of the recipe's run.accelerator)")
    p.add_argument("--mfu", type=float, default=0.4, help="expected model FLOPs utilisation")
    p.add_argument("--out", help="also write the plan as JSON to this file")
    p.set_defaults(func=cmd_plan)

    p = verb("export", help="export a checkpoint to open_clip (hf-hub layout) or its image tower to timm")
    p.add_argument("checkpoint", help="checkpoint directory, or a run directory (its latest checkpoint)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--format", choices=("open_clip", "timm"), default="open_clip",
                   help="open_clip: the whole model; timm: the image tower")
    p.set_defaults(func=cmd_export)

    p = verb("bench", help=f"benchmarks on your storage and GPUs, writing JSON: {', '.join(BENCHMARKS)}")
    p.add_argument("name", choices=BENCHMARKS, help="the benchmark; `clipscale bench NAME --help` lists its options")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="options of the benchmark")
    p.set_defaults(func=cmd_bench)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Options anywhere among a verb's positionals (`train RECIPE --print-run-dir run.name=x`)."""
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if argv and argv[0] in verbs and argv[0] not in PASSTHROUGH:
        return verbs[argv[0]].parse_intermixed_args(argv[1:], argparse.Namespace(command=argv[0]))
    args, unknown = parser.parse_known_args(argv)
    if args.command == "data":  # the data tools parse their own options, `clipscale data --help` included
        args.data_args = unknown + args.data_args
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    args = parse_args(build_parser(), sys.argv[1:] if argv is None else list(argv))
    try:
        return args.func(args)
    except InputError as e:
        print(f"clipscale: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before training installs its own handler: no traceback
        print("clipscale: interrupted", file=sys.stderr)
        return 130
