"""Evaluate every checkpoint of a run directory and append the results to results.jsonl.

Each line of `RUN_DIR/results.jsonl` describes one checkpoint: run, step, samples seen, model size
and compute (GMACs), and the metrics. Checkpoints already in the file are skipped, so `clipscale
eval` can run repeatedly while training continues (e.g. as a separate SLURM job).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from clipscale.checkpoint import complete_checkpoints, load_model_weights, read_meta
from clipscale.config import ConfigError, config_from_dict
from clipscale.evaluate.zeroshot import zeroshot_eval
from clipscale.models import build_model, count_params, gmacs_per_sample

log = logging.getLogger(__name__)
RESULTS = "results.jsonl"
TRAIN_FLOPS_PER_FORWARD = 3  # forward + backward ~ 3x the forward (Kaplan et al. 2020, sec. 2.1)


def read_results(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / RESULTS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def evaluate_run(run_dir: str | Path, *, zeroshot_dir: str | Path | None = None,
                 device: str = "cpu", batch_size: int | None = None) -> list[dict[str, Any]]:
    """Zero-shot evaluate each not-yet-evaluated complete checkpoint; returns the new records."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{run_dir} is not a run directory: {config_file} is missing")
    cfg = config_from_dict(json.loads(config_file.read_text()))
    checkpoints = complete_checkpoints(run_dir / "checkpoints")
    if not checkpoints:
        raise ConfigError(f"{run_dir} has no complete checkpoint under checkpoints/")
    done = {r["checkpoint"] for r in read_results(run_dir)}
    todo = [p for p in checkpoints if p.name not in done]
    if not todo:
        return []
    bundle = build_model(cfg.model, device=device)
    params, gmacs = count_params(bundle.model), gmacs_per_sample(bundle)
    records = []
    for path in todo:
        load_model_weights(path, bundle.model)
        meta = read_meta(path)
        metrics = zeroshot_eval(
            bundle.model, tokenizer=bundle.tokenizer, preprocess=bundle.preprocess_val,
            zeroshot_dir=zeroshot_dir or cfg.eval.zeroshot_dir, device=torch.device(device),
            batch_size=batch_size or cfg.eval.batch_size,
        )
        record = {
            "run": cfg.run.name, "checkpoint": path.name, "step": meta["step"],
            "samples_seen": meta["samples_seen"], "params": params, "gmacs_per_sample": gmacs,
            "train_compute_gmacs": TRAIN_FLOPS_PER_FORWARD * gmacs * meta["samples_seen"], **metrics,
        }
        with open(run_dir / RESULTS, "a") as f:  # one line per checkpoint: a crash loses no result
            f.write(json.dumps(record) + "\n")
        log.info("%s %s zeroshot_top1=%.4f", cfg.run.name, path.name, metrics["zeroshot_top1"])
        records.append(record)
    return records
