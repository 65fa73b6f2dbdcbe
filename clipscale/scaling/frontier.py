"""Which points a law is fitted to: all of them, the strict Pareto frontier, or the binned frontier.

A scaling law in compute describes the best error reachable at each budget, so the literature fits
the lower envelope of error vs compute over all models and durations. Two envelopes:
- strict: the points with a lower error than every cheaper point (non-dominated);
- bins:K: log10 x split into K equal-width bins from the smallest x to 0.1 decade above the largest;
  in each non-empty bin the lowest error, placed at the bin's centre. This is `binned_line_fit` of
  Cherti et al. 2023's `figures.ipynb` (LAION-AI/scaling-laws-openclip), margin included, so their
  published laws come out of clipscale exactly (tests/unit/test_scaling_published.py).
"""
from __future__ import annotations

import numpy as np

from clipscale.scaling.results import FitError

DEFAULT = "bins:5"
TOP_MARGIN_DECADES = 0.1  # the notebook's `eps`: bins span [min, max + 0.1] in log10 x


def parse(spec: str) -> tuple[str, int]:
    """'none' | 'strict' | 'bins:K' -> (method, K); K is 0 unless binned."""
    if spec in ("none", "strict"):
        return spec, 0
    method, _, k = spec.partition(":")
    if method == "bins" and k.isdigit() and int(k) >= 2:
        return method, int(k)
    raise FitError(f"frontier {spec!r} is not one of none, strict, bins:K with K >= 2 (e.g. bins:5)")


def strict(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of points with lower y than every point of smaller or equal x, sorted by x. x, y: (N,)."""
    keep, best = [], np.inf
    for i in np.lexsort((y, x)):
        if y[i] < best:
            keep.append(i)
            best = y[i]
    return np.array(keep, dtype=np.int64)


def bins(x: np.ndarray, y: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Binned frontier: (bin centres (B,), index of each non-empty bin's lowest-y point (B,)).

    x: (N,) positive, y: (N,). Edges as `np.histogram(log10 x, bins=k, range=(min, max + 0.1))`,
    membership as `np.digitize` (edges[i] <= log10 x < edges[i + 1]), like the reference notebook.
    """
    lx = np.log10(x)
    edges = np.histogram_bin_edges(lx, bins=k, range=(lx.min(), lx.max() + TOP_MARGIN_DECADES))
    b = np.digitize(lx, edges) - 1  # (N,) in 0..k-1: the margin keeps the largest x below the top edge
    order = np.lexsort((y, b))  # by bin, then error: each bin's first entry is its lowest error
    first = order[np.r_[True, b[order][1:] != b[order][:-1]]]
    return 10 ** ((edges[b[first]] + edges[b[first] + 1]) / 2), first


def select(x: np.ndarray, y: np.ndarray, spec: str) -> tuple[np.ndarray, np.ndarray]:
    """Points to fit under a frontier spec: (their x (M,), indices into x/y of their source rows (M,)).

    For bins the x is the bin centre and the source row is the bin's best point.
    """
    method, k = parse(spec)
    if method == "none":
        return x, np.arange(len(x))
    if method == "strict":
        idx = strict(x, y)
        return x[idx], idx
    centres, idx = bins(x, y, k)
    return centres, idx
