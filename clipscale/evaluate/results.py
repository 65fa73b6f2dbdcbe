"""The long results table `RUN/results.jsonl`, written by evaluation and read by the scaling fits.

One JSON object per line per (checkpoint, task, eval dataset, metric):

    run, model (open_clip architecture), checkpoint ("step_000064" or null), step, samples_seen,
    params (image + text towers), gmacs_per_sample (forward GMACs of both towers for one pair,
    attention included), compute_gmacs (= gmacs_per_sample * samples_seen, Cherti et al. 2023),
    dataset (upstream training data), task ("zeroshot_classification" | "zeroshot_retrieval" |
    "linear_probe"), eval_dataset, metric (CLIP_benchmark's names), value, eval_hash (class names
    + templates used)

The rows of one evaluation are appended in one write and synced, so a crash loses no finished
evaluation; a torn last line (a crash mid-write) is dropped on the next append.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger(__name__)
RESULTS = "results.jsonl"
TASKS = ("zeroshot_classification", "zeroshot_retrieval", "linear_probe")
COLUMNS = ("run", "model", "checkpoint", "step", "samples_seen", "params", "gmacs_per_sample", "compute_gmacs",
           "dataset", "task", "eval_dataset", "metric", "value", "eval_hash")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelInfo:
    """What the rows say about the evaluated weights."""

    run: str
    """Run name (the target's name for a model outside a run)."""
    model: str
    """open_clip architecture name."""
    checkpoint: str | None
    """Checkpoint directory name, e.g. "step_000064"; None for weights outside a run."""
    step: int | None
    samples_seen: int | None
    params: int
    """Parameters of the image and text towers together."""
    gmacs_per_sample: float
    """Forward GMACs of both towers for one image-text pair (`clipscale.models.gmacs_per_sample`)."""
    dataset: str
    """Upstream training data name."""


def make_rows(info: ModelInfo, *, task: str, eval_dataset: str, eval_hash: str,
              metrics: dict[str, float]) -> list[dict[str, Any]]:
    """One row per metric, with the fields in `COLUMNS` order."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not one of {TASKS}")
    base = dataclasses.asdict(info)
    compute = None if info.samples_seen is None else info.gmacs_per_sample * info.samples_seen
    rows = [{**base, "compute_gmacs": compute, "task": task, "eval_dataset": eval_dataset, "metric": metric,
             "value": float(value), "eval_hash": eval_hash} for metric, value in metrics.items()]
    return [{c: row[c] for c in COLUMNS} for row in rows]


def row_key(row: dict[str, Any]) -> tuple:
    """What identifies one evaluation: rows with the same key are not computed twice.

    The step is part of it: evaluations during training between checkpoints have no checkpoint name.
    """
    return (row["run"], row["model"], row["checkpoint"], row["step"], row["task"], row["eval_dataset"],
            row["eval_hash"])


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a results file (a run directory means its results.jsonl); a torn last line is skipped."""
    path = Path(path)
    path = path / RESULTS if path.is_dir() else path
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number != len(lines):
                raise ValueError(f"{path} line {number} is not JSON; delete that line and evaluate again") from None
            log.warning("%s: dropping a torn last line (an evaluation was interrupted)", path)
    return rows


def append_rows(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Append `rows` in one synced write, first cutting a torn last line left by a crash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":  # torn: keep everything up to the last complete line
                f.seek(0)
                data = f.read()
                f.truncate(data.rfind(b"\n") + 1)
        f.write("".join(json.dumps(r) + "\n" for r in rows).encode())
        f.flush()
        os.fsync(f.fileno())


def write_csv(sources: Iterable[str | Path], out) -> int:
    """Flatten the rows of many results files or run directories into one CSV on the text stream `out`."""
    writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    count = 0
    for source in sources:
        for row in read_results(source):
            writer.writerow(row)
            count += 1
    return count
