"""Fit results files end to end: load, fit, write fits.json and plots, print a table; read fits back.

    clipscale fit runs/*/ --metric acc1 --eval-dataset imagenet1k --by dataset --out fits/
    clipscale predict fits/fits.json --budget 1e12
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from clipscale.results import load_results
from clipscale.scaling.fit import Fit, fit
from clipscale.scaling.results import FitError

FITS = "fits.json"


def fit_results(paths: str | Path | Sequence[str | Path], *, out_dir: str | Path, metric: str,
                **options: Any) -> list[Fit]:
    """Load results, fit (options as `fit.fit`), write out_dir/fits.json and fit_<metric>.png/.pdf."""
    from clipscale.scaling.plot import save_plot  # matplotlib only when plotting

    fits = fit(load_results(paths), metric=metric, **options)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_plot(fits, out_dir, metric=metric)
    tmp = out_dir / f"{FITS}.tmp"
    tmp.write_text(json.dumps({"metric": metric, "fits": [f.to_dict() for f in fits]}, indent=1) + "\n")
    os.replace(tmp, out_dir / FITS)
    return fits


def read_fits(path: str | Path) -> list[Fit]:
    """The fits of a fits.json (or of the directory holding it)."""
    path = Path(path)
    path = path / FITS if path.is_dir() else path
    if not path.is_file():
        raise FitError(f"no fits at {path}: run `clipscale fit ... --out {path.parent}` first")
    try:
        return [Fit.from_dict(d) for d in json.loads(path.read_text())["fits"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise FitError(f"{path} is not a clipscale fits.json ({e}): refit with `clipscale fit`") from e


def _interval(lo_hi: Sequence[float]) -> str:
    return f"[{lo_hi[0]:.4g}, {lo_hi[1]:.4g}]"


def format_fits(fits: Sequence[Fit]) -> str:
    """One block per fit: formula, each parameter with its interval, notes, the holdout check."""
    lines = []
    for f in fits:
        group = ", ".join(f"{k}={v}" for k, v in f.group.items())
        lines.append(f"{group + ': ' if group else ''}{f.formula}  ({f.form}, frontier {f.frontier}, "
                     f"{f.n_points} points)")
        lines += [f"  {k:6s} {v:>11.4g}  95% CI {_interval(f.ci95[k])}" for k, v in f.params.items()]
        lines += [f"  note: {n}" for n in f.notes]
        if f.holdout:
            for p in f.holdout["points"]:
                lines.append(f"  holdout {f.x}={p['x']:.4g}: observed {p['observed']:.4f} predicted "
                             f"{p['predicted']:.4f} 95% PI {_interval(p['pi95'])} "
                             f"{'inside' if p['inside'] else 'OUTSIDE'}")
    return "\n".join(lines)


def format_plan(fits: Sequence[Fit], budgets: Sequence[float]) -> str:
    """Predicted error (and for nd the compute-optimal params / samples seen) at each budget."""
    lines = []
    for f in fits:
        group = ", ".join(f"{k}={v}" for k, v in f.group.items())
        for budget in budgets:
            p = f.plan(budget)
            line = (f"{group + ': ' if group else ''}{f.x}={budget:.4g}: {f.y} = {p['error']:.4f} "
                    f"95% CI {_interval(p['error_ci95'])} PI {_interval(p['error_pi95'])}")
            if "params" in p:
                line += (f"; params {p['params']:.3g} {_interval(p['params_ci95'])}, samples_seen "
                         f"{p['samples_seen']:.3g} {_interval(p['samples_seen_ci95'])}")
            lines.append(line)
    return "\n".join(lines)
