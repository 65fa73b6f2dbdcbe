"""Results-table rows drawn from a known law, for the scaling tests and the notebook test.

Error of a run with N params after D samples: E = E0 + A / N^a + B / D^b with log-normal noise;
checkpoints before the last are 5% worse (an unannealed cosine schedule).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

LAW = {"E0": 0.1, "A": 30.0, "a": 0.35, "B": 50.0, "b": 0.3}
GMACS_PER_PARAM = 2e-9  # forward GMACs per pair per parameter: any constant makes compute proportional to N * D


def law_error(n: np.ndarray, d: np.ndarray, law: dict[str, float] = LAW) -> np.ndarray:
    return law["E0"] + law["A"] / n ** law["a"] + law["B"] / d ** law["b"]


def law_rows(*, seed: int = 0, params: tuple[float, ...] = (1e6, 4e6, 1.6e7, 6.4e7, 2.56e8),
             samples: tuple[float, ...] = (1e7, 1e8, 1e9), noise: float = 0.02, dataset: str = "synthetic-400m",
             eval_datasets: tuple[str, ...] = ("imagenet1k",), checkpoints: int = 2) -> list[dict]:
    """Rows of the results-table schema for a grid of runs (params x samples seen)."""
    rng = np.random.default_rng(seed)
    rows = []
    for n in params:
        for total in samples:
            run = f"{dataset}-n{n:.0e}-d{total:.0e}"
            for k in range(1, checkpoints + 1):
                d = total * k / checkpoints
                error = law_error(np.float64(n), np.float64(d)) * (1.05 if k < checkpoints else 1.0)
                gmacs = GMACS_PER_PARAM * n
                for eval_dataset in eval_datasets:
                    e = float(min(error * np.exp(rng.normal(0, noise)), 0.999))
                    base = {"run": run, "model": f"toy-{n:.0e}", "checkpoint": f"step_{k:06d}", "step": k,
                            "samples_seen": int(d), "params": int(n), "gmacs_per_sample": gmacs,
                            "compute_gmacs": gmacs * d, "dataset": dataset, "task": "zeroshot_classification",
                            "eval_dataset": eval_dataset, "eval_hash": "0" * 8}
                    rows.append({**base, "metric": "acc1", "value": 1 - e})
                    rows.append({**base, "metric": "acc5", "value": 1 - e / 3})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# Training runs with curves: the loss follows the annealing law of Tissue et al. 2024 and the error
# follows the loss (log E = a_run + b * L), with a_run set so that final errors lie on ND_LAW.
ND_LAW = {"E0": 0.2, "A": 2.0, "a": 0.2, "B": 3.0, "b": 0.3}
LOSS_LAW = {"L0": 2.0, "A": 6.0, "alpha": 0.3, "C": 0.02}
ERROR_PER_LOSS = 0.1


def write_training_run(root: Path, *, name: str, params: float, total_samples: int, seed: int = 0,
                       off_law: float = 1.0, batch: int = 64, log_every: int = 2, eval_every: int = 4,
                       noise: float = 0.005) -> Path:
    """A finished run directory (config.json, metrics.jsonl, results.jsonl) of a cosine schedule;
    off_law multiplies its final error (1.0: on ND_LAW)."""
    from clipscale.config import Config, OptimConfig, RunConfig, TrainConfig, record_config
    from clipscale.optim import lr_at
    from clipscale.scaling.forecast import schedule_areas

    rng = np.random.default_rng(seed)
    cfg = Config(run=RunConfig(name=name, output_dir=str(root)),
                 optim=OptimConfig(lr_peak=1e-3, warmup_samples=4 * batch),
                 train=TrainConfig(global_batch_size=batch, total_samples=total_samples))
    run_dir = root / name
    run_dir.mkdir(parents=True)
    record_config(cfg, run_dir)
    steps = np.arange(1, total_samples // batch + 1)
    lr = np.array([lr_at(int(s) * batch, cfg=cfg.optim, total_samples=total_samples) for s in steps])
    s1, s2 = schedule_areas(lr=lr, warmup_steps=4)
    p = LOSS_LAW
    loss = p["L0"] + p["A"] * (params / 1e6) ** -0.1 * s1 ** -p["alpha"] - p["C"] * s2  # (T,) after each step
    final = law_error(np.float64(params), np.float64(total_samples), ND_LAW) * off_law * np.exp(rng.normal(0, 0.02))
    anchor = np.log(final) - ERROR_PER_LOSS * loss[-1]
    metrics = [{"step": int(s), "samples_seen": int(s * batch), "loss": float(loss[s - 2] + rng.normal(0, 0.01)),
                "lr": float(lr[s - 1])} for s in steps[1:] if s % log_every == 0]
    rows = []
    for s in steps[steps % eval_every == 0]:
        e = float(np.exp(anchor + ERROR_PER_LOSS * loss[s - 1] + rng.normal(0, noise)))
        rows.append({"run": name, "model": f"toy-{params:.0e}", "checkpoint": None, "step": int(s),
                     "samples_seen": int(s * batch), "params": int(params), "gmacs_per_sample": GMACS_PER_PARAM * params,
                     "compute_gmacs": GMACS_PER_PARAM * params * s * batch, "dataset": "synthetic",
                     "task": "zeroshot_classification", "eval_dataset": "synthetic", "metric": "acc1",
                     "value": 1 - e, "eval_hash": "0" * 8})
    rows[-1]["value"] = 1 - final  # the final evaluation is the truth a forecast aims at
    write_jsonl(run_dir / "metrics.jsonl", metrics)
    write_jsonl(run_dir / "results.jsonl", rows)
    return run_dir


def write_training_grid(root: Path, *, seed: int = 0, params: tuple[float, ...] = (1e6, 4e6, 1.6e7),
                        samples: tuple[int, ...] = (6_400, 12_800, 25_600)) -> list[Path]:
    """A grid of finished runs (params x samples seen) on ND_LAW."""
    return [write_training_run(root, name=f"grid-n{n:.0e}-d{d}", params=n, total_samples=d, seed=seed + i)
            for i, (n, d) in enumerate((n, d) for n in params for d in samples)]
