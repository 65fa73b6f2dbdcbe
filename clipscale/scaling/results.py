"""What a fit takes from the long results table (read by `clipscale.results`): one metric's rows of
one prompt set, checked, with the error to fit.
"""
from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import pandas as pd

from clipscale.results import ResultsError, with_compute

X_COLUMNS = ("compute_gmacs", "samples_seen", "params")
# How a metric becomes the error that is fitted (`--error`): "1-value" for scores in [0, 1], "value" for
# errors as they are. Accuracies, recalls and mAP (CLIP_benchmark names) are scores; names saying loss or
# error are errors; any other metric needs the choice stated.
ERRORS = ("value", "1-value")
SCORE = re.compile(r"^(acc\d+|mean_per_class_recall|mean_average_precision|(image|text)_retrieval_recall@\d+)$")
NAMED_ERROR = re.compile(r"^(.*[_-])?(loss|error|err\d*|perplexity)$")


FitError = ResultsError
"""Results cannot be loaded or fitted as asked: one error for the table and its fits."""


def error_kind(metric: str, error: str | None = None) -> str:
    """'1-value' or 'value': `error` when given, else what the metric's name says (a score or an error)."""
    if error is not None:
        if error not in ERRORS:
            raise FitError(f"error={error!r} must be one of {list(ERRORS)}: 'value' fits the metric as it is "
                           f"(a loss, an error rate), '1-value' fits 1 - metric (a score in [0, 1])")
        return error
    if SCORE.match(metric):
        return "1-value"
    if NAMED_ERROR.match(metric):
        return "value"
    raise FitError(f"metric {metric!r} is neither an accuracy or recall (acc1, acc5, mean_per_class_recall, "
                   f"mean_average_precision, image/text_retrieval_recall@K: fitted as 1 - value) nor named as an "
                   f"error (loss, *_loss, error, *_error: fitted as it is); say which: --error value (fit "
                   f"{metric} as it is, lower is better) or --error 1-value (fit 1 - {metric}, a score in [0, 1])")


def error_name(metric: str, error: str | None = None) -> str:
    """Name of what is fitted for a metric, e.g. '1 - acc1' or 'loss'."""
    return f"1 - {metric}" if error_kind(metric, error) == "1-value" else metric


def final_checkpoints(df: pd.DataFrame) -> pd.DataFrame:
    """Each run's last evaluated step per task and eval dataset; rows without a run or step (published
    tables) are all kept.

    An intermediate checkpoint of a cosine run has not annealed its learning rate and understates what
    its compute buys.
    """
    if not {"run", "step"} <= set(df):
        return df
    known = df["run"].notna() & df["step"].notna()
    last = df[known].groupby(["run", "task", "eval_dataset"])["step"].transform("max")
    return df[~known | (df["step"] == last.reindex(df.index))]


def select(df: pd.DataFrame, *, metric: str, x: str, eval_dataset: str | None = None, task: str | None = None,
           by: Sequence[str] = (), checkpoints: str = "final", need: Sequence[str] = (),
           error: str | None = None) -> pd.DataFrame:
    """Rows of one metric with an `error` column (as `error_kind`), checked for what a fit needs.

    x: the axis column; need: further columns that must be positive (the nd form's params and
    samples_seen). Raises FitError naming the row's source and the fix.
    """
    if metric not in set(df["metric"]):
        raise FitError(f"metric {metric!r} is not in the results (metrics: {sorted(set(df['metric']))})")
    kind = error_kind(metric, error)
    rows = with_compute(df[df["metric"] == metric])
    for column, value in (("eval_dataset", eval_dataset), ("task", task)):
        if value is not None:
            if value not in set(rows[column]):
                raise FitError(f"no {metric} rows with {column}={value!r} ({column}s: {sorted(set(rows[column]))})")
            rows = rows[rows[column] == value]
        elif rows[column].nunique() > 1 and column not in by:
            raise FitError(f"{metric} rows span several {column}s {sorted(set(rows[column]))}: "
                           f"choose one (--{column.replace('_', '-')}) or add {column} to --by")
    for column in (x, *need, *by):
        if column not in rows:
            raise FitError(f"the results have no column {column!r} (columns: {sorted(rows.columns)}; compute_gmacs "
                           f"can also come from gmacs_per_sample and samples_seen)")
    if checkpoints not in ("final", "all"):
        raise FitError(f"checkpoints={checkpoints!r} must be 'final' or 'all'")
    rows = final_checkpoints(rows) if checkpoints == "final" else rows
    for column in ("value", x, *need):
        values = pd.to_numeric(rows[column], errors="coerce").astype(np.float64)
        bad = rows[~np.isfinite(values)] if column == "value" else rows[~(values > 0)]
        if len(bad):
            first = bad[column].iloc[0]
            first = first.item() if isinstance(first, np.generic) else first
            raise FitError(f"{_where(bad)}: {column}={first!r} ({len(bad)} such rows); a fit needs a "
                           f"finite {'value' if column == 'value' else 'positive ' + column}: fix or drop those rows")
        rows = rows.assign(**{column: values})
    if kind == "value":
        bad = rows[rows["value"] <= 0]
        if len(bad):
            raise FitError(f"{_where(bad)}: {metric}={bad['value'].iloc[0]} ({len(bad)} such rows); an error fitted "
                           f"as it is must be positive to fit in log space: fix or drop those rows, or use "
                           f"--error 1-value if {metric} is a score in [0, 1]")
        return rows.assign(error=rows["value"])
    out_of_range = rows[(rows["value"] < 0) | (rows["value"] >= 1)]
    if len(out_of_range):
        value = out_of_range["value"].iloc[0]
        raise FitError(f"{_where(out_of_range)}: {metric}={value} gives error {1 - value:g}; 1 - {metric} must be "
                       f"in (0, 1] to fit in log space (values in percent? divide them by 100)")
    return rows.assign(error=1.0 - rows["value"])


def _where(bad: pd.DataFrame) -> str:
    """file:line of the first bad row, or its index in a DataFrame built by hand."""
    return str(bad["source"].iloc[0]) if "source" in bad else f"row {bad.index[0]}"


def one_prompt_set(rows: pd.DataFrame, *, eval_hash: str | None = None) -> tuple[pd.DataFrame, dict[tuple, str]]:
    """The rows of one prompt set (`eval_hash`) per (task, eval dataset), and a note for each pair that
    has others.

    Rows evaluated with other class names or templates measure something else, and under a
    frontier the better set would win each bin. eval_hash: the set to fit (a unique prefix is
    enough); None: each pair's newest (latest `evaluated_at`, then latest in the files). Rows
    without an eval_hash (published tables) form one set.
    """
    if "eval_hash" not in rows:
        if eval_hash is not None:
            raise FitError(f"--eval-hash {eval_hash}: the results have no eval_hash column")
        return rows, {}
    hashes = rows["eval_hash"].fillna("").astype(str)
    if eval_hash is not None:
        matching = sorted(set(hashes[hashes.str.startswith(eval_hash)]))
        if len(matching) != 1:
            raise FitError(f"--eval-hash {eval_hash} matches {len(matching) or 'no'} prompt sets "
                           f"{matching or ''} of these rows (their prompt sets: {sorted(set(hashes))}): "
                           "give one of them, or a prefix of exactly one")
        return rows[hashes == matching[0]], {}
    times = rows["evaluated_at"].fillna("").astype(str) if "evaluated_at" in rows else pd.Series("", rows.index)
    keep, notes = pd.Series(False, rows.index), {}
    for pair, group in rows.assign(_hash=hashes, _time=times).groupby(["task", "eval_dataset"], sort=False):
        newest = group.sort_values("_time", kind="stable")["_hash"].iloc[-1]
        keep |= (hashes == newest) & rows.index.isin(group.index)
        others = group[group["_hash"] != newest]
        if len(others):
            counts = ", ".join(f"{h or 'none'} ({n} rows)" for h, n in others["_hash"].value_counts().items())
            notes[pair] = (f"{pair[0]} {pair[1]}: fitted the newest prompt set eval_hash={newest}; rows of other "
                           f"prompt sets left out: {counts}; choose one with --eval-hash")
    return rows[keep], notes
