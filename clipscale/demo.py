"""The Quickstart demo: synthetic shards -> scaling grid (torchrun) -> evaluation -> scaling-law fit.

Every stage writes to disk and the next reads it back, exactly as separate SLURM jobs would.
"""
from __future__ import annotations

import os
import time
from pathlib import Path


def run_demo(*, out: Path, recipe: str | Path, nproc: int) -> None:
    from clipscale.data.synthetic import write_synthetic_dataset
    from clipscale.scaling import fit_results
    from clipscale.sweep import run_local

    t0 = time.perf_counter()
    out = out.resolve()
    specs = write_synthetic_dataset(out / "data", processes=os.cpu_count() or 1)
    print(f"[demo] synthetic data: {specs['train']}", flush=True)
    runs_dir = out / "runs"
    data_overrides = [
        f'data.train_shards="{specs["train"]}"', 'data.name="synthetic"',
        f'eval.datasets=["synthetic={specs["zeroshot"]}"]',
        f'run.output_dir="{runs_dir}"',
    ]
    run_dirs = run_local(recipe, data_overrides, nproc=nproc)  # `clipscale sweep --local`: train, evaluate
    fits = fit_results(run_dirs, out_dir=out / "fit", metric="acc1", task="zeroshot_classification")
    chance = 1 / len((Path(specs["zeroshot"]) / "classnames.txt").read_text().splitlines())
    print_summary(run_dirs, fits=fits, chance=chance, out=out, seconds=time.perf_counter() - t0)


def print_summary(run_dirs: list[Path], *, fits: list, chance: float, out: Path, seconds: float) -> None:
    from clipscale.results import read_rows
    from clipscale.scaling import format_fits

    print(f"\n[demo] zero-shot classification of each run's final checkpoint (chance {chance:.3f})")
    print(f"{'run':28s} {'params':>9s} {'samples':>8s} {'compute_gmacs':>13s} {'acc1':>6s} {'acc5':>6s}")
    for run_dir in run_dirs:
        rows = [r for r in read_rows(run_dir) if r["task"] == "zeroshot_classification"]
        final = max(r["step"] for r in rows)
        value = {r["metric"]: r["value"] for r in rows if r["step"] == final}
        last = next(r for r in rows if r["step"] == final)
        print(f"{last['run']:28s} {last['params']:>9d} {last['samples_seen']:>8d} "
              f"{last['compute_gmacs']:>13.3g} {value['acc1']:>6.3f} {value['acc5']:>6.3f}")
    print("\n[demo] power law in compute (forward GMACs x samples seen) on the binned frontier, 95% bootstrap "
          "intervals over runs:")
    print(format_fits(fits))
    print(f"[demo] runs: {out / 'runs'}/*/  (config.json, metrics.jsonl, results.jsonl, checkpoints/)")
    print(f"[demo] fit:  {out / 'fit' / 'fits.json'}")
    print(f"[demo] plot: {out / 'fit' / 'fit_acc1.png'} (and .pdf)")
    print(f"[demo] finished in {seconds / 60:.1f} min")
