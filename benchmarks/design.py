"""Design benchmark: runs chosen by `scaling.design` vs a log-spaced grid of the same cost, in simulation.

    python -m benchmarks.design --seeds 20 --out docs/bench/design.json --plot docs/bench/design.png

For each form (power, saturating: E against compute C; nd: E against params N and samples seen D)
and seed: a pilot grid of runs is drawn from a known law with log-normal noise and fitted; `design`
chooses runs among candidates within a budget; the same budget buys a grid of runs log-spaced from
the pilot's largest run upwards (compute for power and saturating; N and D scaled together for nd).
The chosen runs' outcomes are then drawn from the true law, the law is refitted (400 bootstrap
replicates, as `clipscale fit`), and the target's 95% prediction interval is compared: its width
(design / grid) and whether it holds a new run drawn at the target (coverage), plus whether the
confidence interval holds the true error.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

import numpy as np
import pandas as pd

from clipscale.bench import environment, write_json
from clipscale.scaling import fit
from clipscale.scaling.design import Candidate, design

NOISE = 0.03  # log-normal noise of a run's error
GMACS_PER_PARAM = 2e-9
LAWS = {
    "power": {"A": 0.9, "alpha": -0.12},
    "saturating": {"E_inf": 0.15, "A": 0.8, "alpha": -0.25},
    "nd": {"E0": 0.1, "A": 30.0, "a": 0.35, "B": 50.0, "b": 0.3},
}


def true_error(form: str, inputs: np.ndarray) -> np.ndarray:
    """Noise-free error at inputs (M, k): compute for power/saturating, (N, D) for nd."""
    p = LAWS[form]
    if form == "power":
        return p["A"] * inputs[:, 0] ** p["alpha"]
    if form == "saturating":
        return p["E_inf"] + p["A"] * inputs[:, 0] ** p["alpha"]
    return p["E0"] + p["A"] / inputs[:, 0] ** p["a"] + p["B"] / inputs[:, 1] ** p["b"]


def rows(form: str, runs: list[tuple[float, float]], rng: np.random.Generator, start: int = 0) -> list[dict]:
    """Result rows of runs (N, D) with errors drawn from the true law."""
    inputs = np.array([[GMACS_PER_PARAM * n * d] if form != "nd" else [n, d] for n, d in runs])
    errors = np.minimum(true_error(form, inputs) * np.exp(rng.normal(0, NOISE, len(runs))), 0.999)
    return [{"run": f"r{start + i}", "model": f"m{n:.3g}", "params": n, "samples_seen": d, "step": 1,
             "gmacs_per_sample": GMACS_PER_PARAM * n, "compute_gmacs": GMACS_PER_PARAM * n * d, "dataset": "sim",
             "task": "zeroshot_classification", "eval_dataset": "sim", "metric": "acc1", "value": 1 - e}
            for i, ((n, d), e) in enumerate(zip(runs, errors))]


def setup(form: str) -> dict[str, Any]:
    """Pilot runs, candidates and target of a form. Compute forms place runs on one line N = D / 10
    (any split: the law only sees C); nd crosses sizes and durations."""
    if form == "nd":
        pilot = [(n, d) for n in (1e6, 4e6, 1.6e7) for d in (1e7, 3e7, 1e8)]
        cands = [(n, d) for n in (4e6, 1.6e7, 6.4e7) for d in (1e8, 3e8, 1e9)]
        target = GMACS_PER_PARAM * 2.56e8 * 4e9
    else:
        pilot = [(d / 10, d) for d in np.geomspace(1e6, 1e8, 6)]
        cands = [(d / 10, d) for d in np.geomspace(1e8, 3e9, 8)]
        target = GMACS_PER_PARAM * 1e10 * 1e11 / 10
    budget = GMACS_PER_PARAM * max(n * d for n, d in cands)  # the largest candidate alone, or several smaller
    return {"pilot": pilot, "candidates": cands, "target": target, "budget": budget}


def grid_runs(form: str, pilot: list[tuple[float, float]], cost: float, k: int = 4) -> list[tuple[float, float]]:
    """k runs log-spaced above the pilot's largest, scaled so that they cost `cost` in total."""
    n0, d0 = max(pilot, key=lambda r: r[0] * r[1])
    lo, hi = 0.0, 10.0
    for _ in range(60):  # bisect the growth factor r of run i = (n0, d0) * r^(i+1)
        r = np.exp((lo + hi) / 2)
        runs = [(n0 * r ** (i + 1), d0 * r ** (i + 1)) for i in range(k)]
        spent = sum(GMACS_PER_PARAM * n * d for n, d in runs)
        lo, hi = (np.log(r), hi) if spent < cost else (lo, np.log(r))
    return runs


def evaluate(form: str, df: pd.DataFrame, target: float, rng: np.random.Generator) -> dict[str, Any]:
    [f] = fit(df, metric="acc1", form=form, frontier="none")
    lo, hi = f.interval([target], kind="prediction")
    clo, chi = f.interval([target])
    truth = float(true_error_at_target(form, target, f))
    new_run = truth * np.exp(rng.normal(0, NOISE))
    return {"pi95": [float(lo[0]), float(hi[0])], "width": float(hi[0] - lo[0]), "ci_width": float(chi[0] - clo[0]),
            "pi_covers_new_run": bool(lo[0] <= new_run <= hi[0]), "ci_covers_truth": bool(clo[0] <= truth <= chi[0])}


def true_error_at_target(form: str, target: float, f) -> float:
    """The true law's error at the target; for nd at the allocation the fit chooses (its prediction is
    for that N and D)."""
    if form != "nd":
        return float(true_error(form, np.array([[target]]))[0])
    p = f.plan(target)
    return float(true_error(form, np.array([[p["params"], p["samples_seen"]]]))[0])


def one(form: str, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    s = setup(form)
    pilot = pd.DataFrame(rows(form, s["pilot"], rng))
    [f] = fit(pilot, metric="acc1", form=form, frontier="none")
    cands = [Candidate(name=f"n{n:.3g}-d{d:.3g}", params=n, samples_seen=d, gmacs_per_sample=GMACS_PER_PARAM * n,
                       cost=GMACS_PER_PARAM * n * d) for n, d in s["candidates"]]
    t0 = time.perf_counter()
    d = design(f, target=s["target"], candidates=cands, budget=s["budget"], seed=seed)
    seconds = time.perf_counter() - t0
    chosen = [(c.params, c.samples_seen) for c in d.chosen]
    spent = sum(c.cost for c in d.chosen)
    out = {"form": form, "seed": seed, "design_seconds": seconds, "chosen": [c.name for c in d.chosen],
           "cost": spent, "expected_ci_width": d.steps[-1]["expected_ci95_width"] if d.steps else None}
    outcome_rng = np.random.default_rng(10_000 + seed)  # the same noise for both arms' evaluation draws
    grid = grid_runs(form, s["pilot"], spent or s["budget"])
    for arm, runs in (("design", chosen), ("grid", grid)):
        rng_arm = np.random.default_rng(outcome_rng.integers(1 << 31))
        new = pd.DataFrame(rows(form, runs, rng_arm, start=len(pilot))) if runs else None
        df = pd.concat([pilot, new], ignore_index=True) if runs else pilot
        out[arm] = evaluate(form, df, s["target"], rng_arm)
    out["grid_runs"] = [f"n{n:.3g}-d{dd:.3g}" for n, dd in grid]
    out["grid_cost"] = sum(GMACS_PER_PARAM * n * dd for n, dd in grid)
    return out


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    summary = {}
    for form in LAWS:
        rs = [r for r in results if r["form"] == form]
        if not rs:
            continue
        ratio = [r["design"]["width"] / r["grid"]["width"] for r in rs]
        ci_ratio = [r["design"]["ci_width"] / r["grid"]["ci_width"] for r in rs]
        summary[form] = {
            "seeds": len(rs), "median_pi_width_ratio_design_over_grid": float(np.median(ratio)),
            "median_ci_width_ratio_design_over_grid": float(np.median(ci_ratio)),
            "design_ci_narrower_fraction": float(np.mean([x < 1 for x in ci_ratio])),
            **{f"{arm}_pi_coverage": float(np.mean([r[arm]["pi_covers_new_run"] for r in rs])) for arm in ("design", "grid")},
            **{f"{arm}_ci_coverage": float(np.mean([r[arm]["ci_covers_truth"] for r in rs])) for arm in ("design", "grid")},
            "median_design_seconds": float(np.median([r["design_seconds"] for r in rs])),
        }
    return summary


def plot(results: list[dict[str, Any]], path: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.2), dpi=120)
    axes = fig.subplots(1, len(LAWS))
    for ax, form in zip(axes, LAWS):
        rs = [r for r in results if r["form"] == form]
        ax.scatter([r["grid"]["ci_width"] for r in rs], [r["design"]["ci_width"] for r in rs], s=12)
        top = max([r["grid"]["ci_width"] for r in rs] + [r["design"]["ci_width"] for r in rs]) * 1.05
        ax.plot([0, top], [0, top], "k--", lw=0.8)
        ax.set_title(form, fontsize=9)
        ax.set_xlabel("grid: target CI width", fontsize=8)
    axes[0].set_ylabel("design: target CI width", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.design", description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--forms", nargs="+", default=list(LAWS), choices=list(LAWS))
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--plot", help="PNG of design vs grid widths")
    args = p.parse_args(argv)
    logging.getLogger("clipscale").setLevel(logging.ERROR)  # few-point notes would flood the output
    results = []
    for form in args.forms:
        for seed in range(args.seeds):
            results.append(one(form, seed))
            r = results[-1]
            print(form, seed, r["chosen"], f"CI design {r['design']['ci_width']:.4f} grid {r['grid']['ci_width']:.4f}",
                  f"PI design {r['design']['width']:.4f} grid {r['grid']['width']:.4f}", flush=True)
    summary = summarize(results)
    write_json(args.out, {"benchmark": "design", "environment": environment(), "noise": NOISE, "laws": LAWS,
                          "setups": {f: setup(f) for f in args.forms}, "summary": summary, "results": results})
    if args.plot:
        plot(results, args.plot)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
