"""Log-log plots of fits (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from clipscale.scaling.laws import power_law  # noqa: E402


def plot_fit(fits: dict[str, Any], path: Path) -> None:
    """All points coloured by run, the frontier circled, the fitted law as a line."""
    fig, ax = plt.subplots(figsize=(6.4, 4.6), dpi=120)
    runs = sorted({p["run"] or "" for p in fits["points"]})
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, max(len(runs), 1)))
    for run, color in zip(runs, colors):
        pts = [p for p in fits["points"] if (p["run"] or "") == run]
        ax.plot([p["x"] for p in pts], [p["y"] for p in pts], "o-", color=color, ms=4, lw=1, alpha=0.8, label=run)
    front = fits["frontier"]
    ax.scatter([p["x"] for p in front], [p["y"] for p in front], s=90, facecolors="none", edgecolors="crimson",
               label="frontier", zorder=3)
    xs = np.geomspace(min(p["x"] for p in fits["points"]), max(p["x"] for p in fits["points"]), 100)
    lo, hi = fits["alpha_ci95"]
    ax.plot(xs, power_law(xs, a=fits["A"], alpha=fits["alpha"]), "--", color="crimson",
            label=f"{fits['formula']}\nalpha 95% CI [{lo:.3f}, {hi:.3f}]")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(fits["x"])
    ax.set_ylabel(fits["y"])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
