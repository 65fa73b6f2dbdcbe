"""Fits of scaling laws with bootstrap intervals, extrapolation checks and compute-optimal planning.

    from clipscale import scaling
    df = scaling.load_results("runs/*/")
    [f] = scaling.fit(df, metric="acc1", eval_dataset="imagenet1k", form="power", frontier="bins:5")
    f.params, f.ci95, f.predict([1e12]), f.plan(1e12)
    scaling.fit(df, metric="contrastive_loss", form="nd")  # an error named as such is fitted as it is

Uncertainty is a bootstrap over runs (all checkpoints of a resampled run come together; rows when
there is no run column) that re-selects the frontier inside every replicate, so the interval
includes the frontier's own sampling noise. 95% intervals are percentiles of the replicates.
Prediction intervals add to each replicate's curve a resampled log residual of the fit.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

import numpy as np
import pandas as pd

from clipscale.scaling import frontier as frontiers
from clipscale.scaling import laws
from clipscale.scaling.results import FitError, error_kind, error_name, one_prompt_set, select

log = logging.getLogger(__name__)
MIN_SUPPORT = 5  # fewer fitted points than this and the intervals rest on very little: warn
ALPHA_ZERO = -1e-5  # an alpha interval reaching this reaches 0 (the saturating form bounds alpha at -1e-6)


@dataclass(frozen=True, kw_only=True)
class Fit:
    """One fitted law for one group of rows; `to_dict()` is its entry in fits.json."""

    group: dict[str, Any]
    """Values of the `by` columns this fit covers ({} without `by`)."""
    form: str
    """power | saturating | nd."""
    frontier: str
    """Points fitted: none | strict | bins:K."""
    x: str
    """Axis of predictions and plots (compute_gmacs for nd, whose inputs are params and samples_seen)."""
    y: str
    """The error fitted, e.g. '1 - acc1' or 'loss'."""
    params: dict[str, float]
    """Fitted parameters in raw units."""
    ci95: dict[str, list[float]]
    """Percentile bootstrap 95% interval of each parameter."""
    n_points: int
    """Points the law was fitted to (after frontier selection)."""
    points: list[dict[str, Any]]
    """The fitted points: x (bin centre for bins), y, and their source row's run, model, inputs."""
    all_points: list[dict[str, Any]]
    """Every eligible row (x, y, run, model, inputs), held-out ones included."""
    bootstrap: dict[str, list[float]]
    """Parameters of each bootstrap replicate."""
    log_residuals: list[float]
    """Log residuals of the fitted points, scaled by sqrt(n / (n - p)) for prediction intervals."""
    holdout: dict[str, Any] | None = None
    """Extrapolation check: the held-out top-x points, predicted vs observed."""
    notes: list[str] = field(default_factory=list)
    """Warnings about the fit (little support, alpha not below 0, unidentifiable floor)."""
    gmacs_per_param_sample: float | None = None
    """nd only: median compute_gmacs / (params * samples_seen), to turn a budget into N * D."""
    huber_delta: float | None = None
    """Huber threshold on log residuals when it replaced the form's own loss (None: the form's own)."""
    y_max: float | None = None
    """Upper end of the error's range (1 for 1 - a score; None for a loss): predictions and intervals are
    clipped to it, as a law in log space can overshoot a bounded error far from the data."""

    @property
    def law(self) -> laws.Law:
        """The functional form."""
        return laws.LAWS[self.form]

    @property
    def formula(self) -> str:
        """The fitted law as text."""
        return laws.formula(self.law, self.params, y=self.y, x=self.x)

    def _replicates(self) -> dict[str, np.ndarray]:
        """Each parameter for the fit (index 0) and each bootstrap replicate: (1 + B,)."""
        return {k: np.r_[self.params[k], self.bootstrap[k]] for k in self.law.params}

    def _curves(self, x: np.ndarray) -> np.ndarray:
        """E at axis values x (n,) for the fit (row 0) and each replicate: (1 + B, n)."""
        params = self._replicates()
        if self.law is not laws.ND:
            return laws.evaluate(self.law, params, x[:, None])
        log_n, log_d = _optimal_log_split(params, x / self.gmacs_per_param_sample)  # (1 + B, n) each
        p = {k: v[:, None] for k, v in params.items()}
        return p["E0"] + np.exp(np.log(p["A"]) - p["a"] * log_n) + np.exp(np.log(p["B"]) - p["b"] * log_d)

    def _clip(self, e: np.ndarray) -> np.ndarray:
        return e if self.y_max is None else np.minimum(e, self.y_max)

    def predict(self, x: Sequence[float] | np.ndarray) -> np.ndarray:
        """Predicted error at axis values x (compute-optimal allocation for nd): (n,)."""
        return self._clip(self._curves(np.atleast_1d(np.asarray(x, dtype=np.float64)))[0])

    def interval(self, x: Sequence[float] | np.ndarray, *, kind: str = "confidence",
                 level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) of the law at x (kind='confidence') or of a new point there (kind='prediction')."""
        return self._interval(self._curves(np.atleast_1d(np.asarray(x, dtype=np.float64))), kind=kind, level=level)

    def _interval(self, curves: np.ndarray, *, kind: str, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
        log_e = np.log(curves[1:])  # (B, n)
        if kind == "prediction":
            rng = np.random.default_rng(0)
            log_e = log_e + rng.choice(np.asarray(self.log_residuals), size=log_e.shape)
        elif kind != "confidence":
            raise FitError(f"interval kind {kind!r} must be 'confidence' or 'prediction'")
        q = 100 * (1 - level) / 2
        return (self._clip(np.exp(np.percentile(log_e, q, axis=0))),
                self._clip(np.exp(np.percentile(log_e, 100 - q, axis=0))))

    def plan(self, budget: float) -> dict[str, Any]:
        """Predicted error at a budget with 95% intervals; for nd also the compute-optimal params and
        samples seen (Hoffmann et al. 2022, eq. 4) with theirs."""
        x = np.array([float(budget)])
        lo, hi = self.interval(x)
        plo, phi = self.interval(x, kind="prediction")
        out = {self.x: float(budget), "error": float(self.predict(x)[0]), "error_ci95": [float(lo[0]), float(hi[0])],
               "error_pi95": [float(plo[0]), float(phi[0])]}
        if self.law is laws.ND:
            split = _optimal_log_split(self._replicates(), x / self.gmacs_per_param_sample)
            for name, log_v in zip(("params", "samples_seen"), (v[:, 0] for v in split)):
                with np.errstate(over="ignore"):  # a replicate with a ~ 0 puts all compute in N: inf is its answer
                    out[name] = float(np.exp(log_v[0]))
                    out[f"{name}_ci95"] = np.exp(np.percentile(log_v[1:], [2.5, 97.5])).tolist()
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready entry of fits.json (with the formula as text)."""
        return {"formula": self.formula, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Fit":
        """The Fit of a fits.json entry."""
        return cls(**{k: v for k, v in d.items() if k != "formula"})


def _optimal_log_split(params: dict[str, np.ndarray], nd_budget: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """argmin over N * D = budget of A/N^a + B/D^b (Hoffmann et al. 2022, eq. 4): (log N, log D), each
    (len(params), len(budget)); in logs because a poorly determined A or a overflows G^(a+b)."""
    p = {k: np.asarray(v, dtype=np.float64)[:, None] for k, v in params.items()}
    log_g = (np.log(p["a"] * p["A"]) - np.log(p["b"] * p["B"])) / (p["a"] + p["b"])
    log_n = log_g + p["b"] / (p["a"] + p["b"]) * np.log(nd_budget)[None, :]
    return log_n, np.log(nd_budget)[None, :] - log_n


def _select(x: np.ndarray, y: np.ndarray, frontier: str) -> tuple[np.ndarray, np.ndarray]:
    """Fitted inputs (M, k) and their source rows (M,) under a frontier (k = 2: nd, always every point)."""
    if x.shape[1] == 2:
        return x, np.arange(len(y))
    xs, rows = frontiers.select(x[:, 0], y, frontier)
    return xs[:, None], rows


def _solve(law: laws.Law, x: np.ndarray, y: np.ndarray, w: np.ndarray, theta0: np.ndarray, *,
           x0: np.ndarray, huber_delta: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Fit B weighted data sets at once: x (B, M, k), y, w (B, M), theta0 (B, P) -> theta, cost."""
    lower, upper = laws.bounds(law, np.where(w > 0, y, np.inf).min(axis=1))
    # a tiny Huber threshold converges slowly (least absolute deviations): more iterations
    max_iter = 100 if huber_delta is None else 1000
    return laws.solve(law, np.log(x / x0), np.log(y), w, theta0, lower=lower, upper=upper, huber_delta=huber_delta,
                      max_iter=max_iter)


def _resampled(x: np.ndarray, y: np.ndarray, counts: np.ndarray, frontier: str) -> tuple[np.ndarray, ...]:
    """Each replicate's fitted points, padded to N: x (B, N, k), y, w (B, N) (w = 0 pads).

    counts (B, N): times each row is drawn. Without a frontier a row drawn k times weighs k; with
    one, the frontier of the drawn rows is selected again and each of its points weighs 1.
    """
    if frontier == "none" or x.shape[1] == 2:
        return np.broadcast_to(x, (len(counts), *x.shape)), np.broadcast_to(y, counts.shape), counts
    bx, by, bw = np.ones((len(counts), *x.shape)), np.ones(counts.shape), np.zeros(counts.shape)
    for b, c in enumerate(counts):
        present = np.flatnonzero(c)
        if np.ptp(x[present]) == 0:
            continue  # one distinct x: nothing to select or fit, the replicate is dropped
        xs, rows = _select(x[present], y[present], frontier)
        bx[b, : len(rows)], by[b, : len(rows)], bw[b, : len(rows)] = xs, y[present][rows], 1.0
    return bx, by, bw


def fit_points(x: np.ndarray, y: np.ndarray, *, form: str, frontier: str, units: np.ndarray | None = None,
               huber_delta: float | None = None, n_bootstrap: int = 400, seed: int = 0) -> dict[str, Any]:
    """Fit a law to raw inputs x (N, k) and errors y (N,) with a bootstrap over units (N,) ints.

    huber_delta: Huber threshold on log residuals instead of the form's loss (nd: 1e-3; power and
    saturating: least squares).

    Returns params, ci95, bootstrap (reported parameters per replicate), selected (source rows
    of the fitted points), x_fit (M, k), log_residuals and notes.
    """
    law = laws.LAWS[form]
    if law is laws.ND and frontiers.parse(frontier)[0] != "none":
        raise FitError(f"the nd form fits every (params, samples_seen) point; use frontier 'none', not {frontier!r}")
    if len(np.unique(x, axis=0)) < 2:
        raise FitError(f"all {len(y)} points share the same inputs {x[0].tolist()}: a law needs several")
    x_fit, selected = _select(x, y, frontier)
    n_params, y_fit = len(law.params), y[selected]
    if len(selected) < n_params + 1:
        raise FitError(f"frontier {frontier} keeps {len(selected)} points; the {form} form needs at least "
                       f"{n_params + 1}: add runs, use a simpler form, or --frontier none")
    x0 = np.exp(np.log(x_fit).mean(axis=0))  # (k,) reference inputs
    theta0 = laws.starts(law, np.log(x_fit / x0), np.log(y_fit))
    s = len(theta0)
    thetas, costs = _solve(law, np.broadcast_to(x_fit, (s, *x_fit.shape)), np.broadcast_to(y_fit, (s, len(y_fit))),
                           np.ones((s, len(y_fit))), theta0, x0=x0, huber_delta=huber_delta)
    theta = thetas[np.nanargmin(costs)]

    # Bootstrap: resample units, re-select the frontier, refit from the full fit's parameters.
    rng = np.random.default_rng(seed)
    unit_ids, unit_of_row = np.unique(np.arange(len(y)) if units is None else units, return_inverse=True)
    unit_counts = np.zeros((n_bootstrap, len(unit_ids)))
    np.add.at(unit_counts, (np.arange(n_bootstrap)[:, None], rng.integers(0, len(unit_ids), unit_counts.shape)), 1)
    bx, by, bw = _resampled(x, y, unit_counts[:, unit_of_row], frontier)
    # a replicate with fewer distinct inputs than parameters is degenerate
    ok = np.array([len(np.unique(rx[rw > 0], axis=0)) >= n_params for rx, rw in zip(bx, bw)])
    if ok.sum() < n_bootstrap / 2:
        raise FitError(f"only {ok.sum()} of {n_bootstrap} bootstrap replicates keep {n_params} distinct points: "
                       f"too few runs for the {form} form; add runs or use a simpler form")
    boot_theta, _ = _solve(law, bx[ok], by[ok], bw[ok], np.tile(theta, (int(ok.sum()), 1)), x0=x0,
                           huber_delta=huber_delta)

    boot = laws.to_reported(law, boot_theta, x0)
    ci95 = {k: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] for k, v in boot.items()}
    pred, _ = laws.log_model(law, theta[None], np.log(x_fit / x0)[None])
    residuals = (np.log(y_fit) - pred[0]) * np.sqrt(len(y_fit) / max(len(y_fit) - n_params, 1))
    params = {k: float(v[0]) for k, v in laws.to_reported(law, theta[None], x0).items()}
    return {"params": params, "ci95": ci95,
            "bootstrap": {k: v.tolist() for k, v in boot.items()}, "selected": selected, "x_fit": x_fit,
            "log_residuals": residuals.tolist(),
            "notes": _notes(form, params, ci95, n_points=len(selected), y_min=y_fit.min(),
                            dropped=n_bootstrap - ok.sum())}


def _notes(form: str, params: dict[str, float], ci95: dict[str, list[float]], *, n_points: int, y_min: float,
           dropped: int) -> list[str]:
    notes = []
    if n_points < MIN_SUPPORT:
        notes.append(f"only {n_points} points support the fit: its intervals rest on very little data")
    if "alpha" in params:
        lo, hi = ci95["alpha"]
        if params["alpha"] >= 0:
            notes.append(f"alpha = {params['alpha']:+.4f} >= 0: the error does not fall as x grows; check the "
                         f"metric, the --error direction and the x column")
        elif hi >= ALPHA_ZERO:
            notes.append(f"alpha's 95% interval [{lo:.4f}, {hi:.4f}] reaches 0: these data do not show the error "
                         f"falling as x grows")
    floor = {"saturating": "E_inf", "nd": "E0"}.get(form)
    if floor and ci95[floor][0] <= 1e-3 * y_min:
        notes.append(f"{floor} is not identifiable: its interval reaches 0, these data do not determine a floor")
    if dropped:
        notes.append(f"{dropped} bootstrap replicates had too few distinct points and were dropped")
    return notes


def fit(df: pd.DataFrame, *, metric: str, eval_dataset: str | None = None, task: str | None = None,
        form: str = "power", frontier: str | None = None, x: str = "compute_gmacs", by: Sequence[str] = (),
        holdout: int = 0, checkpoints: str = "final", error: str | None = None, eval_hash: str | None = None,
        huber_delta: float | None = None, n_bootstrap: int = 400, seed: int = 0) -> list[Fit]:
    """One fit per group of `by` values of the metric's error against x.

    error: 'value' (fit the metric as it is) or '1-value'; by default 1 - value for accuracies and
    recalls, the value for metrics named as errors (loss, *_loss, error, *_error); other metrics
    need it (FitError otherwise);
    form: power | saturating | nd; frontier: none | strict | bins:K (default bins:5, none for nd);
    holdout: fit without the K highest-x rows of each group and check the law's prediction of them;
    huber_delta: Huber threshold on log residuals instead of the form's loss (nd: 1e-3, Hoffmann et
    al. 2022; power, saturating: least squares); a tiny one (1e-8) fits least absolute deviations;
    checkpoints: each run's "final" checkpoint or "all" of them; eval_hash: the prompt set to fit
    (default: the newest of each task and eval dataset, with a note naming the others).
    """
    if form not in laws.LAWS:
        raise FitError(f"form {form!r} is not one of {sorted(laws.LAWS)}")
    if huber_delta is not None and not huber_delta > 0:
        raise FitError(f"huber_delta={huber_delta!r} must be a positive threshold on log residuals (e.g. 1e-3), "
                       f"or None for the form's own loss")
    frontier = frontier or ("none" if form == "nd" else frontiers.DEFAULT)
    frontiers.parse(frontier)
    if form == "nd" and x != "compute_gmacs":
        raise FitError(f"the nd form fits params and samples_seen and plans in compute_gmacs; drop --x {x}")
    need = ("params", "samples_seen") if form == "nd" else ()
    rows = select(df, metric=metric, x=x, eval_dataset=eval_dataset, task=task, by=by, checkpoints=checkpoints,
                  need=need, error=error)
    rows, prompt_notes = one_prompt_set(rows, eval_hash=eval_hash)
    groups = rows.groupby(list(by), sort=True, dropna=False) if by else [((), rows)]
    fits = []
    for key, group in groups:
        labels = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        labels = {k: _plain(v) for k, v in labels.items()}
        try:
            f = _fit_group(group, group_labels=labels, metric=metric, error=error, form=form, frontier=frontier,
                           x=x, holdout=holdout, huber_delta=huber_delta, n_bootstrap=n_bootstrap, seed=seed)
        except FitError as e:
            raise FitError(f"group {labels}: {e}" if labels else str(e)) from e
        pairs = set(zip(group["task"], group["eval_dataset"]))
        fits.append(replace(f, notes=[note for pair, note in prompt_notes.items() if pair in pairs] + f.notes))
    for f in fits:
        for note in f.notes:
            log.warning("%s%s: %s", f.form, f" {f.group}" if f.group else "", note)
    return fits


def _plain(v: Any) -> Any:
    """A JSON-ready scalar: numpy numbers as Python ones, NaN as None."""
    if isinstance(v, (float, np.floating)) and np.isnan(v):
        return None
    return v.item() if isinstance(v, np.generic) else v


def _row(row: pd.Series, columns: Sequence[str]) -> dict[str, Any]:
    return {c: _plain(row[c]) for c in columns if c in row.index}


def _fit_group(rows: pd.DataFrame, *, group_labels: dict[str, Any], metric: str, error: str | None, form: str,
               frontier: str, x: str, holdout: int, huber_delta: float | None, n_bootstrap: int, seed: int) -> Fit:
    law = laws.LAWS[form]
    inputs = ["params", "samples_seen"] if law is laws.ND else [x]
    rows = rows.sort_values(x, kind="stable")
    axis, y = rows[x].to_numpy(np.float64), rows["error"].to_numpy(np.float64)
    inputs_all = rows[inputs].to_numpy(np.float64)
    has_runs = "run" in rows and rows["run"].notna().all()
    units = pd.factorize(rows["run"])[0] if has_runs else np.arange(len(rows))
    held = np.zeros(len(rows), dtype=bool)
    if holdout:
        if not 0 < holdout < len(rows) - 2:
            raise FitError(f"--holdout {holdout} leaves too few of {len(rows)} rows to fit")
        held[-holdout:] = True  # rows are sorted by x: the top-x rows
    r = fit_points(inputs_all[~held], y[~held], form=form, frontier=frontier, units=units[~held],
                   huber_delta=huber_delta, n_bootstrap=n_bootstrap, seed=seed)
    info = ["run", "model", "checkpoint", "source"]
    fitted = rows[~held].iloc[r["selected"]]
    points = [{"x": float(ax), "y": float(e), **_row(row, info + inputs)}
              for ax, e, (_, row) in zip(r["x_fit"][:, 0] if law is not laws.ND else fitted[x], fitted["error"],
                                         fitted.iterrows())]
    all_points = [{"x": float(ax), "y": float(e), "held_out": bool(h), **_row(row, info)}
                  for ax, e, h, (_, row) in zip(axis, y, held, rows.iterrows())]
    per_param_sample = float(np.median(axis / inputs_all.prod(axis=1))) if law is laws.ND else None
    f = Fit(group=group_labels, form=form, frontier=frontier, x=x, y=error_name(metric, error), params=r["params"],
            ci95=r["ci95"], n_points=len(points), points=points, all_points=all_points, bootstrap=r["bootstrap"],
            log_residuals=r["log_residuals"], notes=r["notes"], gmacs_per_param_sample=per_param_sample,
            huber_delta=huber_delta, y_max=1.0 if error_kind(metric, error) == "1-value" else None)
    if not holdout:
        return f
    return replace(f, holdout=_check_holdout(f, rows, held, inputs))


def _check_holdout(f: Fit, rows: pd.DataFrame, held: np.ndarray, inputs: list[str]) -> dict[str, Any]:
    """Predicted vs observed error of the held-out rows (those on the strict frontier of all rows when
    the law describes a frontier: a dominated point is not what the law predicts)."""
    compare = held.copy()
    if f.frontier != "none":
        on_front = np.zeros(len(rows), dtype=bool)
        on_front[frontiers.strict(rows[f.x].to_numpy(np.float64), rows["error"].to_numpy(np.float64))] = True
        compare &= on_front
    target = rows[compare]
    if f.law is laws.ND:
        curves = laws.evaluate(f.law, f._replicates(), target[inputs].to_numpy(np.float64))
    else:
        curves = f._curves(target[f.x].to_numpy(np.float64))
    lo, hi = f._interval(curves, kind="prediction")
    points = [{"x": float(row[f.x]), "observed": float(row["error"]), "predicted": float(p), "pi95": [float(a), float(b)],
               "inside": bool(a <= row["error"] <= b), **_row(row, ["run", "model", "source"])}
              for p, a, b, (_, row) in zip(f._clip(curves[0]), lo, hi, target.iterrows())]
    return {"k": int(held.sum()), "points": points,
            "inside_fraction": float(np.mean([p["inside"] for p in points])) if points else None}
