"""Live forecast: a training run's final error from its partial curves, and whether it is on its grid's law.

    from clipscale import scaling
    fc = scaling.forecast("runs/grid-w128-48k", grid=["runs/grid-*/"], metric="acc1", form="nd")
    print(fc.summary()); fc.plot(ax)

Method. An intermediate checkpoint of a cosine run has not annealed, so its error overstates the
final one and a power law through the partial curve is biased. The training loss follows the
learning-rate annealing law of Tissue et al. 2024 ("Scaling Law with Learning Rate Annealing",
eq. 1): L(s) = L0 + A * S1^-alpha - C * S2, where S1 is the summed learning rate up to step s
(forward area, in steps at peak lr) and S2 the annealing area, the summed momentum of lr decreases
(m_i = lambda * m_(i-1) + lr_(i-1) - lr_i, lambda = 0.999). Both areas are known for every step
of the run from its config (clipscale.optim.lr_at), so the law fitted to the logged losses so far
(after warmup) extends to the end of the schedule. The error follows the loss: log E = a_run +
b * L, with b pooled over the grid's finished runs (within each run) and a_run from the run's own
evaluations, so the forecast is log E_T = mean over the last evaluations of log E_j + b (L_T - L_j).
Its 95% interval is calibrated on the grid's finished runs: each is cut at the same fraction of
its samples and forecast the same way; the mean and spread of their log misses correct the bias and
set a normal prediction interval for one more miss (t quantile, sd * sqrt(1 + 1/n)). The grid's law (fitted without this
run) predicts the final error at the run's params and samples seen with its prediction interval;
the run is "on the law" while its forecast lies inside that interval. The combined forecast
weighs the two in log space by their inverse variances.
"""
from __future__ import annotations

import glob
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from scipy.optimize import nnls
from scipy.stats import t as student_t

from clipscale.results import load_results
from clipscale.scaling import laws
from clipscale.scaling.fit import Fit, fit
from clipscale.scaling.results import FitError, select

MOMENTUM = 0.999  # lambda of the annealing momentum (Tissue et al. 2024, sec. 3)
ALPHAS = np.geomspace(0.05, 3.0, 48)  # the loss law's exponent: a grid, each point a linear NNLS fit
LAST_EVALS = 3  # the forecast averages the mapping over this many latest evaluations


@dataclass(frozen=True, kw_only=True)
class RunCurves:
    """What a run has logged so far and its full schedule."""

    run: str
    run_dir: str
    total_samples: int
    params: float
    gmacs_per_sample: float
    eval_samples: np.ndarray
    """(J,) samples seen at each evaluation of the metric."""
    eval_errors: np.ndarray
    """(J,) error (1 - metric) at each evaluation."""
    loss_samples: np.ndarray
    """(L,) samples seen at each logged training loss."""
    losses: np.ndarray
    schedule_samples: np.ndarray
    """(T,) samples seen after each step of the whole schedule."""
    s1: np.ndarray
    """(T,) forward area after each step, in steps at peak lr."""
    s2: np.ndarray
    """(T,) annealing area after each step."""
    warmup_samples: int

    def cut(self, samples: float) -> "RunCurves":
        """The curves as they stood at `samples` samples seen."""
        e, l_ = self.eval_samples <= samples, self.loss_samples <= samples
        return RunCurves(**{**self.__dict__, "eval_samples": self.eval_samples[e], "eval_errors": self.eval_errors[e],
                            "loss_samples": self.loss_samples[l_], "losses": self.losses[l_]})

    @property
    def samples_seen(self) -> int:
        return int(max(self.eval_samples.max(initial=0), self.loss_samples.max(initial=0)))


def schedule_areas(*, lr: np.ndarray, warmup_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """S1 and S2 after each step (Tissue et al. 2024, eq. 1) for the learning rates of steps 1..T (T,).

    Areas are in steps at peak lr; the annealing momentum starts after warmup (the warmup's rising lr
    is not an annealing)."""
    rel = lr / lr.max()
    s1 = np.cumsum(rel)
    drop = np.r_[0.0, rel[:-1] - rel[1:]]
    drop[: warmup_steps + 1] = 0.0
    m = np.zeros_like(rel)
    for i in range(1, len(rel)):
        m[i] = MOMENTUM * m[i - 1] + drop[i]
    return s1, np.cumsum(m)


def read_run(run_dir: str | Path, *, metric: str, eval_dataset: str | None = None,
             task: str | None = None) -> RunCurves:
    """The curves of a run directory: config.json (the schedule), metrics.jsonl (loss), results.jsonl."""
    from clipscale.config import config_from_dict  # the run's own resolved config
    from clipscale.optim import lr_at

    run_dir = Path(run_dir)
    for name in ("config.json", "metrics.jsonl", "results.jsonl"):
        if not (run_dir / name).is_file():
            raise FitError(f"{run_dir / name} not found: forecast reads a run directory of `clipscale train` "
                           f"with eval.every_samples (or `clipscale eval RUN --watch`) writing results.jsonl")
    cfg = config_from_dict(json.loads((run_dir / "config.json").read_text()))
    rows = select(load_results(run_dir), metric=metric, x="samples_seen", eval_dataset=eval_dataset, task=task,
                  checkpoints="all").sort_values("samples_seen")
    rows = rows.drop_duplicates("samples_seen", keep="last")
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    logged = [r for r in logged if "loss" in r and np.isfinite(r["loss"])]
    batch, total = cfg.train.global_batch_size, cfg.train.total_samples
    steps = np.arange(1, total // batch + 1)
    lr = np.array([lr_at(int(s) * batch, cfg=cfg.optim, total_samples=total) for s in steps])
    s1, s2 = schedule_areas(lr=lr, warmup_steps=int(np.ceil(cfg.optim.warmup_samples / batch)))
    return RunCurves(run=cfg.run.name, run_dir=str(run_dir), total_samples=int(steps[-1] * batch),
                     params=float(rows["params"].iloc[-1]), gmacs_per_sample=float(rows["gmacs_per_sample"].iloc[-1]),
                     eval_samples=rows["samples_seen"].to_numpy(np.float64),
                     eval_errors=rows["error"].to_numpy(np.float64),
                     loss_samples=np.array([r["samples_seen"] for r in logged], dtype=np.float64),
                     losses=np.array([r["loss"] for r in logged], dtype=np.float64), schedule_samples=steps * batch,
                     s1=s1, s2=s2, warmup_samples=cfg.optim.warmup_samples)


def _areas_at(c: RunCurves, samples: np.ndarray, *, before_step: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """S1, S2 at samples seen; a loss logged at step k was computed before update k (before_step)."""
    i = np.searchsorted(c.schedule_samples, samples) - (1 if before_step else 0)
    i = np.clip(i, 0, len(c.s1) - 1)
    return c.s1[i], c.s2[i]


def fit_loss_law(c: RunCurves, *, shape: tuple[float, float] | None = None, n_bootstrap: int = 0,
                 seed: int = 0) -> np.ndarray:
    """(L0, A, alpha, C) of the annealing law fitted to the losses after warmup: (1 + n_bootstrap, 4),
    row 0 the fit, the rest residual-bootstrap refits.

    shape: (alpha, C) held fixed (from a finished run of the grid), fitting only L0 and A. A partial
    cosine curve has seen little annealing, so its own C (and alpha) are barely determined by it.
    """
    keep = c.loss_samples > c.warmup_samples
    if keep.sum() < 4:
        raise FitError(f"{c.run_dir}: {int(keep.sum())} training losses logged after warmup; the forecast needs "
                       f"at least 4 (lower train.log_every_steps or wait)")
    s1, s2 = _areas_at(c, c.loss_samples[keep], before_step=True)
    loss = c.losses[keep]
    best = _nnls_law(s1, s2, loss[None], shape=shape)[0]
    if not n_bootstrap:
        return best[None]
    fitted = _loss(best, s1, s2)
    rng = np.random.default_rng(seed)
    boot = fitted[None] + rng.choice(loss - fitted, size=(n_bootstrap, len(loss)))
    return np.r_[best[None], _nnls_law(s1, s2, boot, shape=shape)]


def _nnls_law(s1: np.ndarray, s2: np.ndarray, losses: np.ndarray, *,
              shape: tuple[float, float] | None) -> np.ndarray:
    """Best (L0, A, alpha, C) with L0, A, C >= 0 for each row of losses (R, n): for each alpha on a
    grid the law is linear, solved by NNLS; with a fixed shape only L0 and A are solved for."""
    out = np.zeros((len(losses), 4))
    best = np.full(len(losses), np.inf)
    for alpha in ALPHAS if shape is None else [shape[0]]:
        columns = [np.ones_like(s1), s1 ** -alpha] + ([-s2] if shape is None else [])
        design = np.stack(columns, axis=1)
        for r, y in enumerate(losses):
            coef, rnorm = nnls(design, y if shape is None else y + shape[1] * s2)
            if rnorm < best[r]:
                best[r] = rnorm
                out[r] = [coef[0], coef[1], alpha, coef[2] if shape is None else shape[1]]
    return out


def _loss(p: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> np.ndarray:
    return p[0] + p[1] * s1 ** -p[2] - p[3] * s2


def _mapping_points(c: RunCurves, law: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fitted loss, log error) at the run's evaluations after warmup."""
    keep = c.eval_samples > c.warmup_samples
    s1, s2 = _areas_at(c, c.eval_samples[keep])
    return _loss(law, s1, s2), np.log(c.eval_errors[keep])


def error_slope(finished: Sequence[RunCurves]) -> float:
    """b of log E = a_run + b * L, pooled within runs over finished runs' full curves."""
    num = den = 0.0
    for c in finished:
        loss, log_e = _mapping_points(c, fit_loss_law(c)[0])
        if len(loss) >= 2:
            num += ((loss - loss.mean()) * (log_e - log_e.mean())).sum()
            den += ((loss - loss.mean()) ** 2).sum()
    if den <= 0:
        raise FitError("no finished grid run has two evaluations after warmup to relate error to loss")
    return num / den


def curve_forecast(c: RunCurves, *, slope: float, shape: tuple[float, float] | None = None,
                   n_bootstrap: int = 0) -> np.ndarray:
    """log E at the end of the schedule from the curves so far: (1 + n_bootstrap,)."""
    laws_ = fit_loss_law(c, shape=shape, n_bootstrap=n_bootstrap)
    keep = np.flatnonzero(c.eval_samples > c.warmup_samples)[-LAST_EVALS:]
    if not len(keep):
        raise FitError(f"{c.run_dir}: no evaluation of the metric after warmup yet ({c.warmup_samples} samples)")
    s1, s2 = _areas_at(c, c.eval_samples[keep])
    s1_t, s2_t = c.s1[-1], c.s2[-1]
    out = []
    for p in laws_:
        out.append(np.mean(np.log(c.eval_errors[keep]) + slope * (_loss(p, s1_t, s2_t) - _loss(p, s1, s2))))
    return np.array(out)


@dataclass(frozen=True, kw_only=True)
class Forecast:
    """A run's forecast final error, the grid law's prediction for it, and the verdict."""

    run: str
    metric: str
    y: str
    samples_seen: int
    total_samples: int
    observed: list[list[float]]
    """[samples_seen, error] of each evaluation so far."""
    forecast: float
    """The run's own forecast of its final error (curves + schedule), calibrated."""
    forecast_pi95: list[float]
    law: float
    """The grid law's prediction of the final error at the run's params and samples seen."""
    law_pi95: list[float]
    combined: float
    """Forecast and law weighed by inverse variance in log space."""
    combined_pi95: list[float]
    on_law: bool
    """Whether the forecast lies inside the law's 95% prediction interval."""
    trajectory: list[list[float]]
    """[samples_seen, error] the fitted loss law implies from the first evaluation to the end."""
    calibration_runs: int
    notes: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        if self.on_law:
            return "on the law"
        return "OFF the law: " + ("worse" if self.forecast > self.law_pi95[1] else "better") + " than it predicts"

    def summary(self) -> str:
        """One line: progress, latest error, forecast with interval, law interval, verdict."""
        f, l_ = self.forecast_pi95, self.law_pi95
        done = self.samples_seen / self.total_samples
        return (f"{self.run} {self.samples_seen}/{self.total_samples} samples ({done:.0%}): "
                f"{self.y} now {self.observed[-1][1]:.4f}, "
                f"final forecast {self.forecast:.4f} [{f[0]:.4f}, {f[1]:.4f}], "
                f"law {self.law:.4f} [{l_[0]:.4f}, {l_[1]:.4f}], combined {self.combined:.4f}: {self.verdict}")

    def plot(self, ax: Any) -> None:
        """Evaluations so far, the implied trajectory to the end, the forecast and the law's interval."""
        obs = np.array(self.observed)
        traj = np.array(self.trajectory)
        ax.plot(obs[:, 0], obs[:, 1], "o", color="C0", label=f"{self.run}: evaluations")
        ax.plot(traj[:, 0], traj[:, 1], "-", color="C0", alpha=0.6, label="annealing-law trajectory")
        t = self.total_samples
        below, above = self.forecast - self.forecast_pi95[0], self.forecast_pi95[1] - self.forecast
        ax.errorbar([t], [self.forecast], yerr=[[below], [above]],
                    fmt="s", color="C0", capsize=4, label="forecast, 95% PI")
        ax.errorbar([t * 1.02], [self.law], yerr=[[self.law - self.law_pi95[0]], [self.law_pi95[1] - self.law]],
                    fmt="D", color="C3", capsize=4, label="grid law, 95% PI")
        ax.set_xlabel("samples seen")
        ax.set_ylabel(self.y)
        ax.set_title(self.verdict, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def law_prediction(law: Fit, c: RunCurves) -> tuple[float, list[float]]:
    """The grid law's error at the run's final inputs and its 95% PI (nd: params and samples seen; a
    law on an axis: the run's value on it)."""
    if law.law is laws.ND:
        curves = laws.evaluate(law.law, law._replicates(), np.array([[c.params, c.total_samples]]))
    else:
        x = {"compute_gmacs": c.gmacs_per_sample * c.total_samples, "samples_seen": c.total_samples,
             "params": c.params}[law.x]
        curves = law._curves(np.array([x]))
    lo, hi = law._interval(curves, kind="prediction")
    return float(curves[0, 0]), [float(lo[0]), float(hi[0])]


def forecast(run_dir: str | Path, *, grid: Sequence[str | Path], metric: str, eval_dataset: str | None = None,
             task: str | None = None, form: str = "nd", law: Fit | None = None, until_samples: float | None = None,
             n_bootstrap: int = 200) -> Forecast:
    """Forecast the final error of the run in `run_dir` (see the module docstring).

    grid: the grid's run directories (globs allowed; the run itself is left out): its finished runs
    calibrate the forecast and, unless `law` is given, their final evaluations fit the law (`form`).
    until_samples: use only what the run had logged by then (to test forecasts on finished runs).
    """
    run = read_run(run_dir, metric=metric, eval_dataset=eval_dataset, task=task)
    if until_samples is not None:
        run = run.cut(until_samples)
    others = _grid_runs(grid, exclude=Path(run_dir), metric=metric, eval_dataset=eval_dataset, task=task)
    finished = [c for c in others if c.eval_samples.size and c.eval_samples[-1] >= c.total_samples]
    if law is None:
        if not finished:
            raise FitError(f"no finished run among the grid's {len(others)} other runs to fit the law to: wait for "
                           f"one, or pass the grid's law (--fits fits.json)")
        rows = load_results([c.run_dir for c in finished])
        [law] = fit(rows, metric=metric, eval_dataset=eval_dataset, task=task, form=form)
    notes = []
    if not finished:
        notes.append("no finished grid run: the loss law's shape comes from this run's partial curve alone")
    slope = error_slope(finished) if finished else error_slope([run])
    shapes = {c.run: tuple(fit_loss_law(c)[0][[2, 3]]) for c in finished}  # (alpha, C) of full curves
    own = curve_forecast(run, slope=slope, shape=_nearest_shape(run, finished, shapes), n_bootstrap=n_bootstrap)
    resid = _calibration(finished, fraction=run.samples_seen / run.total_samples, slope=slope, shapes=shapes)
    if len(resid) >= 3:
        # a normal prediction interval for one more miss from n seen ones: t quantile, sd * sqrt(1 + 1/n)
        n = len(resid)
        bias = float(np.mean(resid))
        half = float(student_t.ppf(0.975, n - 1) * np.std(resid, ddof=1) * np.sqrt(1 + 1 / n))
        half = max(half, laws.Z95 * float(np.std(own[1:])))
    else:
        notes.append(f"only {len(resid)} finished grid runs to calibrate on: the interval is the bootstrap of the "
                     f"loss fit alone and likely too narrow")
        bias, half = 0.0, laws.Z95 * float(np.std(own[1:]))
    mu = float(own[0] + bias)
    law_mu, law_pi = law_prediction(law, run)
    sd_own, sd_law = half / laws.Z95, (np.log(law_pi[1]) - np.log(law_pi[0])) / (2 * laws.Z95)
    w = np.array([1 / max(sd_own, 1e-6) ** 2, 1 / max(sd_law, 1e-6) ** 2])
    mu_c = float((w[0] * mu + w[1] * np.log(law_mu)) / w.sum())
    half_c = laws.Z95 / np.sqrt(w.sum())
    return Forecast(run=run.run, metric=metric, y=law.y, samples_seen=run.samples_seen, total_samples=run.total_samples,
                    observed=[[float(s), float(e)] for s, e in zip(run.eval_samples, run.eval_errors)],
                    forecast=float(np.exp(mu)), forecast_pi95=[float(np.exp(mu - half)), float(np.exp(mu + half))],
                    law=law_mu, law_pi95=law_pi, combined=float(np.exp(mu_c)),
                    combined_pi95=[float(np.exp(mu_c - half_c)), float(np.exp(mu_c + half_c))],
                    on_law=bool(law_pi[0] <= np.exp(mu) <= law_pi[1]),
                    trajectory=_trajectory(run, slope, _nearest_shape(run, finished, shapes)),
                    calibration_runs=len(resid), notes=notes)


def _grid_runs(grid: Sequence[str | Path], *, exclude: Path, **metric: Any) -> list[RunCurves]:
    dirs = []
    for spec in grid:
        dirs += sorted(glob.glob(str(spec))) if glob.has_magic(str(spec)) else [str(spec)]
    out = []
    for d in dict.fromkeys(Path(d).resolve() for d in dirs):
        if d != exclude.resolve():
            out.append(read_run(d, **metric))
    return out


def _nearest_shape(c: RunCurves, finished: Sequence[RunCurves],
                   shapes: dict[str, tuple[float, float]]) -> tuple[float, float] | None:
    """(alpha, C) of the finished run (other than c) nearest in log params and log samples."""
    others = [o for o in finished if o.run != c.run]
    if not others:
        return None
    near = min(others, key=lambda o: np.log(o.params / c.params) ** 2 + np.log(o.total_samples / c.total_samples) ** 2)
    return shapes[near.run]


def _calibration(finished: Sequence[RunCurves], *, fraction: float, slope: float,
                 shapes: dict[str, tuple[float, float]]) -> np.ndarray:
    """log(true final error) - log(forecast) of finished runs cut at the same fraction of their samples,
    each forecast as this run's is (the shape from its nearest other finished run)."""
    resid = []
    for c in finished:
        try:
            cut = c.cut(fraction * c.total_samples)
            shape = _nearest_shape(c, finished, shapes)
            resid.append(np.log(c.eval_errors[-1]) - curve_forecast(cut, slope=slope, shape=shape)[0])
        except FitError:
            continue  # too early in that run for a forecast: it does not calibrate this one
    return np.array(resid)


def _trajectory(c: RunCurves, slope: float, shape: tuple[float, float] | None) -> list[list[float]]:
    """The error the fitted loss law implies along the rest of the schedule (before calibration)."""
    p = fit_loss_law(c, shape=shape)[0]
    keep = np.flatnonzero(c.eval_samples > c.warmup_samples)[-LAST_EVALS:]
    s1, s2 = _areas_at(c, c.eval_samples[keep])
    anchor = np.mean(np.log(c.eval_errors[keep]) - slope * _loss(p, s1, s2))
    samples = c.schedule_samples[c.schedule_samples >= c.eval_samples[keep[0]]]
    s1, s2 = _areas_at(c, samples)
    log_e = anchor + slope * _loss(p, s1, s2)
    return [[float(s), float(e)] for s, e in zip(samples, np.exp(log_e))]
