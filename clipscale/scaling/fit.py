"""Fit power laws to evaluation results (`results.jsonl`) on the compute-optimal frontier.

    clipscale fit runs/*/ --metric zeroshot_top1 --x train_compute_gmacs --out fits/

For an accuracy the error is 1 - metric. The law is fitted on the frontier: the points that reach
a lower error than every cheaper point (Cherti et al. 2023 fit the Pareto frontier of compute vs
error over all models and durations). By default only each run's final checkpoint is eligible:
an intermediate checkpoint of a cosine run has not annealed its learning rate and understates what
that compute buys (`checkpoints="all"` uses every checkpoint, e.g. for constant+cooldown runs with
cooled-down checkpoints). Uncertainty: a bootstrap over frontier points gives 95%
intervals of A and alpha.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from clipscale.scaling import laws

class FitError(ValueError):
    """Results cannot be fitted as asked; the message names the file, field or condition."""


HIGHER_IS_BETTER_HINTS = ("top1", "top5", "acc", "recall", "r@")


def load_results(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Records from results.jsonl files or run directories (their results.jsonl)."""
    records = []
    for path in map(Path, paths):
        file = path / "results.jsonl" if path.is_dir() else path
        if not file.is_file():
            raise FitError(f"no results at {file}: run `clipscale eval` on the run directory first")
        for i, line in enumerate(file.read_text().splitlines(), 1):
            if line.strip():
                try:
                    records.append({**json.loads(line), "_source": str(file)})
                except json.JSONDecodeError as e:
                    raise FitError(f"{file}:{i} is not JSON: {e}") from e
    return records


def pareto_frontier(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of points with lower y than every point of smaller x, sorted by x. x, y: (N,)."""
    order = np.lexsort((y, x))
    keep, best = [], np.inf
    for i in order:
        if y[i] < best:
            keep.append(i)
            best = y[i]
    return np.array(keep, dtype=int)


def fit_power_law(x: np.ndarray, y: np.ndarray, *, n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Fit y = A x^alpha with 95% bootstrap intervals; x, y: (N,) positive, >= 2 distinct x."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(np.unique(x)) < 2:
        raise FitError(f"need at least 2 distinct x values to fit a power law, got {len(np.unique(x))}")
    if (x <= 0).any() or (y <= 0).any():
        raise FitError("power-law fits need positive x and y (an error of 0 cannot be fitted in log space)")
    a, alpha = laws.fit_log_linear(x, y)
    rng = np.random.default_rng(seed)
    boot = []
    for _ in range(n_bootstrap):
        idx = rng.integers(0, len(x), len(x))
        if len(np.unique(x[idx])) >= 2:
            boot.append(laws.fit_log_linear(x[idx], y[idx]))
    boot_a, boot_alpha = np.array(boot).T if boot else (np.array([a]), np.array([alpha]))
    return {
        "A": a, "alpha": alpha, "r2_log": laws.r2_log(x, y, a=a, alpha=alpha), "n": int(len(x)),
        "A_ci95": [float(np.percentile(boot_a, 2.5)), float(np.percentile(boot_a, 97.5))],
        "alpha_ci95": [float(np.percentile(boot_alpha, 2.5)), float(np.percentile(boot_alpha, 97.5))],
        "n_bootstrap": len(boot),
    }


def final_checkpoints(records: list[dict[str, Any]]) -> np.ndarray:
    """Indices of each run's last evaluated checkpoint (largest step)."""
    last: dict[Any, int] = {}
    for i, r in enumerate(records):
        run = r.get("run", r["_source"])
        if run not in last or r.get("step", 0) > records[last[run]].get("step", 0):
            last[run] = i
    return np.array(sorted(last.values()), dtype=np.int64)


def fit_results(paths: Sequence[str | Path], *, metric: str = "zeroshot_top1", x: str = "train_compute_gmacs",
                out_dir: str | Path, higher_is_better: bool | None = None,
                checkpoints: str = "final") -> dict[str, Any]:
    """Fit error(x) = A x^alpha on the frontier of the eligible checkpoints ("final" of each run, or
    "all"); write out_dir/fits.json and out_dir/fit.png."""
    from clipscale.scaling.plot import plot_fit

    records = load_results(paths)
    for r in records:
        for field in (metric, x):
            if field not in r:
                raise FitError(f"{r['_source']}: a record has no field '{field}' (fields: {sorted(r)})")
    if higher_is_better is None:
        higher_is_better = any(h in metric.lower() for h in HIGHER_IS_BETTER_HINTS)
    xs = np.array([r[x] for r in records], dtype=np.float64)
    values = np.array([r[metric] for r in records], dtype=np.float64)
    errors = 1.0 - values if higher_is_better else values
    eligible = final_checkpoints(records) if checkpoints == "final" else np.arange(len(records))
    front = eligible[pareto_frontier(xs[eligible], errors[eligible])]
    y_name = f"1 - {metric}" if higher_is_better else metric
    fit = fit_power_law(xs[front], errors[front])
    fits = {
        "metric": metric, "x": x, "y": y_name, "higher_is_better": higher_is_better, "law": "E = A * C^alpha",
        "fitted_on": f"compute frontier (points better than every cheaper point) of {checkpoints} checkpoints",
        **fit,
        "formula": laws.formula(a=fit["A"], alpha=fit["alpha"], y=y_name, x=x),
        "frontier": [{"run": records[i].get("run"), "step": records[i].get("step"), "x": xs[i], "y": errors[i]}
                     for i in front],
        "points": [{"run": r.get("run"), "step": r.get("step"), "x": float(cx), "y": float(e)}
                   for r, cx, e in zip(records, xs, errors)],
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_fit(fits, out_dir / "fit.png")
    tmp = out_dir / "fits.json.tmp"
    tmp.write_text(json.dumps(fits, indent=2) + "\n")
    os.replace(tmp, out_dir / "fits.json")
    return fits
