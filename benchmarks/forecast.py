"""Forecast benchmark: leave-one-out forecasts of finished runs from their first 25/50/75% of samples.

    python -m benchmarks.forecast --train --grid-dir /tmp/forecast_grid   # trains the CPU grid (~30 min)
    python -m benchmarks.forecast --grid-dir /tmp/forecast_grid --out docs/bench/forecast.json

The grid is benchmarks/forecast_grid.toml: the demo's 3 widths x 16k / 32k / 48k samples, each run
evaluated every 2,048 samples while it trains. Every run is left out in turn: the grid's law is fitted
to the other runs' final evaluations, the run's curve is cut at 25, 50 and 75% of its samples, and
`clipscale.scaling.forecast` predicts its final error; the error of the forecast and whether the
truth lies in its 95% interval are recorded. "demo grid" rows use only the demo's grid (16k and 48k
runs) and only the evaluations at its checkpoints (every 8,192 samples), as `clipscale demo` then
`clipscale eval` would leave them.
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from clipscale.bench import environment, write_json
from clipscale.config import load_sweep
from clipscale.scaling import forecast
from clipscale.scaling.results import FitError

GRID = Path(__file__).with_name("forecast_grid.toml")


def train_grid(grid_dir: Path) -> list[Path]:
    """Synthetic data and every run of the grid (one process each, skipped when finished)."""
    from clipscale.data.synthetic import write_synthetic_dataset

    specs = write_synthetic_dataset(grid_dir / "data")
    runs_dir = grid_dir / "runs"
    data = [f'data.train_shards="{specs["train"]}"', f'eval.datasets=["synthetic={specs["zeroshot"]}"]',
            f'run.output_dir="{runs_dir}"']
    run_dirs = []
    for name, overrides in load_sweep(GRID):
        run_dirs.append(runs_dir / name)
        if (runs_dir / name / "done").is_file():
            continue
        subprocess.run([sys.executable, "-m", "clipscale", "train", str(GRID), *overrides, *data], check=True)
        (runs_dir / name / "done").write_text("")
    return run_dirs


FRACTIONS = (0.25, 0.5, 0.75)
DEMO_CHECKPOINT_SAMPLES = 8_192  # recipes/scaling_tiny.toml: train.checkpoint_every_samples
DEMO_LOG_EVERY_STEPS = 10  # the default train.log_every_steps the demo runs with


def demo_view(run_dirs: list[Path], out: Path) -> list[Path]:
    """The demo's grid (16k and 48k runs) as `clipscale demo` + `clipscale eval` leave it: evaluations at
    checkpoints only, a loss every 10 steps. Config linked, metrics and results filtered."""
    view = []
    for run in run_dirs:
        if run.name.endswith("-32k"):
            continue
        target = out / run.name
        target.mkdir(parents=True, exist_ok=True)
        (target / "config.json").unlink(missing_ok=True)
        (target / "config.json").symlink_to(run / "config.json")
        keep = {"results.jsonl": lambda r: r["samples_seen"] % DEMO_CHECKPOINT_SAMPLES == 0,
                "metrics.jsonl": lambda r: r["step"] % DEMO_LOG_EVERY_STEPS == 0 or "loss" not in r}
        for name, wanted in keep.items():
            rows = [json.loads(line) for line in (run / name).read_text().splitlines() if line.strip()]
            (target / name).write_text("".join(json.dumps(r) + "\n" for r in rows if wanted(r)))
        view.append(target)
    return view


def grid_law(run_dirs: list[Path], *, form: str):
    """The law of the runs' final evaluations: `form`, else (too few runs determine it: nd's 5
    parameters need about 8) the power law on the binned frontier, else through every run."""
    from clipscale.scaling import fit, load_results

    rows = load_results([str(r) for r in run_dirs])
    for options in ({"form": form}, {"form": "power"}, {"form": "power", "frontier": "none"}):
        try:
            return fit(rows, metric="acc1", **options)[0]
        except FitError as e:
            error = e
    raise error


def leave_one_out(run_dirs: list[Path], *, form: str) -> list[dict[str, Any]]:
    """Each run forecast from its first 25/50/75% of samples, the rest of the grid as its grid."""
    out = []
    for run in run_dirs:
        law = grid_law([r for r in run_dirs if r != run], form=form)
        for fraction in FRACTIONS:
            rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines() if line.strip()]
            truth = max(rows, key=lambda r: r["samples_seen"] * (r["metric"] == "acc1"))
            total = truth["samples_seen"]
            try:
                fc = forecast(run, grid=[str(r) for r in run_dirs], metric="acc1", law=law,
                              until_samples=fraction * total)
            except FitError as e:
                out.append({"run": run.name, "fraction": fraction, "skipped": str(e)})
                continue
            true_error = 1 - truth["value"]
            out.append({"run": run.name, "fraction": fraction, "law_form": law.form, "true_error": true_error,
                        "last_observed": fc.observed[-1][1], "forecast": fc.forecast, "forecast_pi95": fc.forecast_pi95,
                        "law": fc.law, "law_pi95": fc.law_pi95, "combined": fc.combined,
                        "combined_pi95": fc.combined_pi95, "on_law": fc.on_law,
                        "calibration_runs": fc.calibration_runs})
            print(fc.summary(), f"truth {true_error:.4f}", flush=True)
    return out


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per fraction: median |log error| and 95% coverage of the forecast, the law, the combination, and
    of the naive 'latest evaluation' as a forecast."""
    summary = {}
    for fraction in FRACTIONS:
        rs = [r for r in results if r["fraction"] == fraction and "skipped" not in r]
        if not rs:
            continue
        t = np.log([r["true_error"] for r in rs])
        row = {"runs": len(rs), "skipped": sum(r["fraction"] == fraction and "skipped" in r for r in results)}
        for name in ("forecast", "law", "combined", "last_observed"):
            row[f"{name}_median_abs_log_error"] = float(np.median(np.abs(np.log([r[name] for r in rs]) - t)))
            if name != "last_observed":
                row[f"{name}_coverage"] = float(np.mean([r[f"{name}_pi95"][0] <= r["true_error"] <= r[f"{name}_pi95"][1]
                                                         for r in rs]))
        summary[str(fraction)] = row
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.forecast", description=__doc__.splitlines()[0])
    p.add_argument("--grid-dir", type=Path, required=True)
    p.add_argument("--train", action="store_true", help="train the grid first (finished runs are skipped)")
    p.add_argument("--form", default="nd", choices=("power", "nd"), help="the grid's law")
    p.add_argument("--out", help="JSON file to write")
    p.add_argument("--plot", help="PNG of the largest run's forecast from half its samples")
    args = p.parse_args(argv)
    run_dirs = train_grid(args.grid_dir) if args.train else [args.grid_dir / "runs" / n for n, _ in load_sweep(GRID)]
    if not args.out:
        return 0
    run_dirs = [r for r in run_dirs if (r / "done").is_file()]  # runs still training are not part of the grid
    logging.getLogger("clipscale").setLevel(logging.ERROR)  # few-point fit notes would flood the output
    grids = {"cpu_grid": run_dirs, "demo_grid": demo_view(run_dirs, args.grid_dir / "demo_view")}
    results = {name: leave_one_out(dirs, form=args.form) for name, dirs in grids.items()}
    write_json(args.out, {"benchmark": "forecast", "environment": environment(), "form": args.form,
                          "runs": {name: [d.name for d in dirs] for name, dirs in grids.items()},
                          "summary": {name: summarize(r) for name, r in results.items()}, "results": results})
    print(json.dumps({name: summarize(r) for name, r in results.items()}, indent=1))
    if args.plot:
        plot_example(run_dirs, args.plot, form=args.form)
    return 0


def plot_example(run_dirs: list[Path], path: str, *, form: str) -> None:
    from matplotlib.figure import Figure

    run = run_dirs[-1]  # the grid's largest model, longest run
    total = json.loads((run / "config.json").read_text())["train"]["total_samples"]
    law = grid_law(run_dirs[:-1], form=form)
    fc = forecast(run, grid=[str(r) for r in run_dirs], metric="acc1", law=law, until_samples=total / 2)
    rows = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines() if line.strip()]
    later = [(r["samples_seen"], 1 - r["value"]) for r in rows if r["metric"] == "acc1" and r["samples_seen"] > total / 2]
    fig = Figure(figsize=(6.5, 4), dpi=120)
    ax = fig.subplots()
    fc.plot(ax)
    ax.plot(*zip(*later), "o", mfc="none", color="C0", alpha=0.5, label="evaluations after the cut (not used)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    sys.exit(main())
