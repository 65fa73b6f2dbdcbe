"""The Quickstart demo: synthetic shards -> scaling grid (torchrun) -> evaluation -> power-law fit.

Every stage writes to disk and the next reads it back, exactly as separate SLURM jobs would.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from clipscale.config import load_sweep

log = logging.getLogger(__name__)


def run_demo(*, out: Path, recipe: Path, nproc: int) -> None:
    from clipscale.data.synthetic import write_synthetic_dataset
    from clipscale.evaluate.runner import evaluate_run, read_results
    from clipscale.scaling.fit import fit_results

    t0 = time.perf_counter()
    out = out.resolve()
    specs = write_synthetic_dataset(out / "data", processes=os.cpu_count() or 1)
    print(f"[demo] synthetic data: {specs['train']}", flush=True)
    runs_dir = out / "runs"
    data_overrides = [
        f'data.train_shards="{specs["train"]}"', f'eval.zeroshot_dir="{specs["zeroshot"]}"',
        f'run.output_dir="{runs_dir}"',
    ]
    run_dirs = []
    for name, overrides in load_sweep(recipe):
        print(f"[demo] training {name} on {nproc} processes", flush=True)
        launch_torchrun(recipe, overrides + data_overrides, nproc=nproc)
        run_dirs.append(runs_dir / name)
    for run_dir in run_dirs:
        evaluate_run(run_dir)
    fits = fit_results(run_dirs, metric="zeroshot_top1", out_dir=out / "fit")
    print_summary(run_dirs, read_results, fits=fits, out=out, seconds=time.perf_counter() - t0)


def launch_torchrun(recipe: Path, overrides: list[str], *, nproc: int) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--standalone", "-m", "clipscale", "train", str(recipe), *overrides,
           "log.progress_bar=false"]
    subprocess.run(cmd, check=True)


def print_summary(run_dirs: list[Path], read_results, *, fits: dict, out: Path, seconds: float) -> None:
    print("\n[demo] zero-shot top-1 of the final checkpoint of each run "
          f"(chance = {fits.get('chance', float('nan')):.3f})" if "chance" in fits else
          "\n[demo] zero-shot top-1 of the final checkpoint of each run")
    print(f"{'run':40s} {'params':>10s} {'samples':>9s} {'GMACs':>10s} {'top1':>6s}")
    for run_dir in run_dirs:
        last = max(read_results(run_dir), key=lambda r: r["step"])
        print(f"{last['run']:40s} {last['params']:>10d} {last['samples_seen']:>9d} "
              f"{last['train_compute_gmacs']:>10.3g} {last['zeroshot_top1']:>6.3f}")
    print(f"\n[demo] fit on the compute frontier: {fits['formula']}")
    print(f"[demo] runs:    {out / 'runs'}  (config.json, metrics.jsonl, results.jsonl, checkpoints/)")
    print(f"[demo] fit:     {out / 'fit' / 'fits.json'}")
    print(f"[demo] plot:    {out / 'fit' / 'fit.png'}")
    print(f"[demo] finished in {seconds / 60:.1f} min")
