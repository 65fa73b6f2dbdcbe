"""Log-log plots of fits (matplotlib; files are drawn on a bare Figure, so no display or pyplot backend).

    from clipscale.scaling.plot import draw_fit
    draw_fit(fit, ax, color="C1")  # on any matplotlib axes, e.g. in a notebook

Per group: every eligible point faint, the fitted points marked, held-out points as crosses, the law
with its 95% band over the fitted range and dashed beyond it, the formula in the legend. Plotting
depends on fitting, never the reverse: `clipscale.scaling.fit` imports no matplotlib.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure

from clipscale.scaling.fit import Fit

EXTRAPOLATE = 10.0  # the dashed line runs to 10x the largest fitted x (or the largest point, if further)


def draw_fit(fit: Fit, ax: Any, *, color: Any = None, label: str | None = None) -> None:
    """Draw one fit on log-log axes ax."""
    color = color or "C0"
    seen = [p for p in fit.all_points if not p["held_out"]]
    held = [p for p in fit.all_points if p["held_out"]]
    ax.scatter([p["x"] for p in seen], [p["y"] for p in seen], s=12, color=color, alpha=0.25, linewidths=0)
    ax.scatter([p["x"] for p in fit.points], [p["y"] for p in fit.points], s=36, color=color, edgecolors="black",
               linewidths=0.6, zorder=3)
    if held:
        ax.scatter([p["x"] for p in held], [p["y"] for p in held], s=40, color=color, marker="x", zorder=3)
    lo_x, hi_x = min(p["x"] for p in fit.points), max(p["x"] for p in fit.points)
    far_x = max(EXTRAPOLATE * hi_x, max(p["x"] for p in fit.all_points))
    for xs, style in ((np.geomspace(lo_x, hi_x, 60), "-"), (np.geomspace(hi_x, far_x, 40), "--")):
        lo, hi = fit.interval(xs)
        ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0)
        ax.plot(xs, fit.predict(xs), style, color=color, lw=1.5,
                label=(label or fit.formula) if style == "-" else None)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(fit.x)
    ax.set_ylabel(fit.y)
    ax.grid(True, which="both", alpha=0.3)


def legend_label(fit: Fit) -> str:
    """Group values, formula and the exponent's interval."""
    group = ", ".join(f"{k}={v}" for k, v in fit.group.items())
    exponent = next(k for k in ("alpha", "b") if k in fit.params)
    lo, hi = fit.ci95[exponent]
    return f"{group + ': ' if group else ''}{fit.formula}\n{exponent} 95% CI [{lo:.3f}, {hi:.3f}], {fit.n_points} pts"


def save_plot(fits: Sequence[Fit], out_dir: Path, *, metric: str) -> list[Path]:
    """One figure of all groups' fits, written as PNG and PDF (atomically); returns the paths."""
    fig = Figure(figsize=(7.0, 5.0), dpi=120)
    ax = fig.subplots()
    for i, f in enumerate(fits):
        draw_fit(f, ax, color=f"C{i}", label=legend_label(f))
    ax.set_title(f"{fits[0].y}: {fits[0].form} law, frontier {fits[0].frontier}", fontsize=9)
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    stem = "fit_" + re.sub(r"[^A-Za-z0-9_.-]", "_", metric)
    paths = []
    for suffix in (".png", ".pdf"):
        path = out_dir / f"{stem}{suffix}"
        tmp = out_dir / f"{stem}.tmp{suffix}"
        fig.savefig(tmp)
        os.replace(tmp, path)
        paths.append(path)
    return paths
