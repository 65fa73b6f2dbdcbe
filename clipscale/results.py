"""The long results table `RUN/results.jsonl`: its schema, and the one place that reads and appends it.

One JSON object per line per (checkpoint, task, eval dataset, metric):

    run, model (open_clip architecture), checkpoint ("step_000064" or null), step, samples_seen,
    params (image + text towers), gmacs_per_sample (forward GMACs of both towers for one pair,
    attention included), compute_gmacs (= gmacs_per_sample * samples_seen, Cherti et al. 2023),
    dataset (upstream training data, `data.name`), task, eval_dataset, metric (CLIP_benchmark's
    names; clip_loss / siglip_loss for the held-out loss), value, eval_hash (what defines the
    evaluation beyond the set: class names and templates, or the loss and its batch size),
    evaluated_at (UTC time of the evaluation)

Several writers may append to one table at once (training's `eval.every_samples` and a `clipscale
eval --watch` beside it, on one host or on several over NFS). An append holds an exclusive
`flock` on the table while it repairs a torn tail, drops rows already in the table (same
`IDENTITY`) and writes its rows in one synced write; a read holds a shared lock, so it sees whole
appends. On Linux NFS clients `flock` is a whole-file byte-range lock that the server arbitrates
(NLM for NFSv3, NFSv4's own locks), and taking it revalidates the client's cache, so an append lands
at the true end of the file; fsync before the unlock makes the rows visible to the next lock holder.
A crash mid-write leaves a torn last line: every reader ignores it and the next append removes it.
Published results in CSV or JSONL with the same columns load like clipscale's own (`load_results`).
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import errno
import fcntl
import glob
import json
import logging
import os
from pathlib import Path
from typing import IO, Any, Iterable, Sequence

import pandas as pd

from clipscale.errors import InputError

log = logging.getLogger(__name__)
RESULTS = "results.jsonl"
TASKS = ("zeroshot_classification", "zeroshot_retrieval", "linear_probe", "contrastive_loss")
COLUMNS = ("run", "model", "checkpoint", "step", "samples_seen", "params", "gmacs_per_sample", "compute_gmacs",
           "dataset", "task", "eval_dataset", "metric", "value", "eval_hash", "evaluated_at")
IDENTITY = ("run", "model", "checkpoint", "step", "task", "eval_dataset", "metric", "eval_hash")
"""Columns that identify a row: an append skips rows whose identity the table already holds (a run's
step fixes its dataset and samples seen, so tables written before `data.name` are not evaluated again)."""
REQUIRED = ("model", "dataset", "task", "eval_dataset", "metric", "value")
"""Columns every table must have to be fitted."""
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class ResultsError(InputError):
    """Results cannot be read (or fitted as asked); the message names the file, line, column or value and
    the fix. `clipscale.scaling.FitError` is this class."""


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
    """Forward GMACs of both towers for one image-text pair (`clipscale.compute.gmacs_per_sample`)."""
    dataset: str
    """Upstream training data name (`data.name`)."""


def make_rows(info: ModelInfo, *, task: str, eval_dataset: str, eval_hash: str,
              metrics: dict[str, float]) -> list[dict[str, Any]]:
    """One row per metric, with the fields in `COLUMNS` order."""
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not one of {TASKS}")
    base = dataclasses.asdict(info)
    compute = None if info.samples_seen is None else info.gmacs_per_sample * info.samples_seen
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
    rows = [{**base, "compute_gmacs": compute, "task": task, "eval_dataset": eval_dataset, "metric": metric,
             "value": float(value), "eval_hash": eval_hash, "evaluated_at": now} for metric, value in metrics.items()]
    return [{c: row[c] for c in COLUMNS} for row in rows]


def row_key(row: dict[str, Any]) -> str:
    """A row's identity (`IDENTITY`) as a hashable value."""
    return json.dumps([row.get(c) for c in IDENTITY])


def evaluation_key(row: dict[str, Any]) -> str:
    """What identifies one evaluation (all its metrics): one that is in the table is not computed again."""
    return json.dumps([row.get(c) for c in IDENTITY if c != "metric"])


def table_file(path: str | Path) -> Path:
    """The results file of a run directory, or `path` itself."""
    path = Path(path)
    return path / RESULTS if path.is_dir() else path


def _lock(f: IO[bytes], operation: int, *, file: Path) -> None:
    """flock the open table; on a filesystem without locks go on unlocked, saying so (one writer only)."""
    try:
        fcntl.flock(f.fileno(), operation)
    except OSError as e:
        if e.errno not in NO_LOCKS:
            raise
        log.warning("%s: the filesystem refuses locks (%s); with several writers rows may be lost: mount it "
                    "with locking (NFS without `nolock`) or let one process write this table", file, e)


def _split_torn(data: bytes) -> tuple[bytes, bytes]:
    """(complete lines, torn tail): a tail without its newline is torn unless it is a whole JSON row."""
    end = data.rfind(b"\n") + 1
    tail = data[end:]
    if tail.strip():
        try:
            json.loads(tail)
            return data + b"\n", b""  # only the newline is missing
        except ValueError:
            return data[:end], tail
    return data[:end], tail


def _parse(data: bytes, *, file: Path, strict: bool = True) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) of the complete lines; a bad line raises (strict) or is skipped."""
    complete, torn = _split_torn(data)
    if torn.strip():
        log.info("%s: ignoring a torn last line (a write in progress or interrupted)", file)
    rows = []
    for number, line in enumerate(complete.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"a {type(row).__name__}, not an object")
        except ValueError as e:
            if strict:
                raise ResultsError(f"{file}:{number} is not JSON ({e}): fix or delete that line") from None
            continue
        rows.append((number, row))
    return rows


def _read_numbered(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    file = table_file(path)
    try:
        f = open(file, "rb")
    except FileNotFoundError:
        return []
    with f:
        _lock(f, fcntl.LOCK_SH, file=file)  # a whole append or none of it
        data = f.read()
    return _parse(data, file=file)


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a results file (a run directory means its results.jsonl; none yet: []).

    A torn last line is ignored; any other line that is not a JSON object raises ResultsError.
    """
    return [row for _, row in _read_numbered(path)]


def append_rows(path: str | Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Append the rows whose identity the table lacks, in one synced write under an exclusive lock.

    Returns the rows written. A torn last line left by a crashed writer is removed first (while
    the lock is held no other writer can be mid-write).
    """
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    with os.fdopen(os.open(file, os.O_RDWR | os.O_CREAT, 0o644), "r+b") as f:
        _lock(f, fcntl.LOCK_EX, file=file)
        data = f.read()  # read after locking: on NFS the lock revalidates the cached size and pages
        complete, torn = _split_torn(data)
        if torn:
            log.warning("%s: removing a torn last line of %d bytes (a writer was interrupted)", file, len(torn))
        seen = {row_key(r) for _, r in _parse(complete, file=file, strict=False)}
        new = []
        for row in rows:
            if row_key(row) not in seen:
                seen.add(row_key(row))
                new.append(row)
        if len(new) < len(rows):
            log.info("%s: %d of %d rows were already in the table (another writer)", file, len(rows) - len(new),
                     len(rows))
        kept = len(data) - len(torn)
        if torn:
            f.truncate(kept)
        f.seek(kept)
        f.write(complete[kept:])  # the newline of a whole last row that lacked it, or nothing
        f.write("".join(json.dumps(r) + "\n" for r in new).encode())
        f.flush()
        os.fsync(f.fileno())
    return new


def write_csv(sources: Iterable[str | Path], out) -> int:
    """Flatten the rows of many results files or run directories into one CSV on the text stream `out`."""
    writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    count = 0
    for source in sources:
        for row in read_rows(source):
            writer.writerow(row)
            count += 1
    return count


def _files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    files = []
    for spec in [paths] if isinstance(paths, (str, Path)) else paths:
        matches = sorted(glob.glob(str(spec))) if glob.has_magic(str(spec)) else [str(spec)]
        if not matches:
            raise ResultsError(f"no results match {spec}: check the glob or run `clipscale eval` first")
        for match in map(Path, matches):
            file = table_file(match)
            if not file.is_file():
                raise ResultsError(f"no results at {file}: run `clipscale eval` on the run directory first")
            files.append(file)
    return files


def _table(file: Path) -> pd.DataFrame:
    if file.suffix == ".csv":
        table = pd.read_csv(file)
        table["source"] = [f"{file}:{i + 2}" for i in range(len(table))]  # line 1 is the header
        return table
    rows = [{**row, "source": f"{file}:{number}"} for number, row in _read_numbered(file)]
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=[*COLUMNS, "source"])  # no rows yet


def load_results(paths: str | Path | Sequence[str | Path]) -> pd.DataFrame:
    """All rows of results.jsonl files, run directories (their results.jsonl), CSV files and globs.

    Adds `source` (file:line of each row) and fills `compute_gmacs` from gmacs_per_sample *
    samples_seen where it is missing.
    """
    tables = []
    for file in _files(paths):
        table = _table(file)
        missing = [c for c in REQUIRED if c not in table.columns]
        if missing:
            raise ResultsError(f"{file} lacks the columns {missing} of the results table "
                               f"(has {sorted(table.columns)})")
        tables.append(table)
    return with_compute(pd.concat(tables, ignore_index=True))


def with_compute(df: pd.DataFrame) -> pd.DataFrame:
    """df with compute_gmacs filled from gmacs_per_sample * samples_seen where it is missing."""
    if not {"gmacs_per_sample", "samples_seen"} <= set(df):
        return df
    derived = df["gmacs_per_sample"] * df["samples_seen"]
    return df.assign(compute_gmacs=df["compute_gmacs"].fillna(derived) if "compute_gmacs" in df else derived)
