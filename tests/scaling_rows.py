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
