"""Functional forms of scaling laws and the batched least-squares solver that fits them.

Forms (E: error, C: the x axis, e.g. compute in GMACs; N: params; D: samples seen):
- power:      E = A * C^alpha                     (Kaplan et al. 2020, eq. 1.3; Cherti et al. 2023, sec. 3)
- saturating: E = E_inf + A * C^alpha             (an irreducible error E_inf; Henighan et al. 2020, eq. 1.1)
- nd:         E = E0 + A / N^a + B / D^b          (Hoffmann et al. 2022, eq. 2 and approach 3)

Every form is fitted to log E (residuals in log space, so a 1% miss at 0.2 weighs as much as at 0.8).
Internally x is divided by a reference x0 (the geometric mean of the fitted points) so that the
coefficients and exponents are not correlated through a large log x; reported parameters are in raw
units. The solver is Levenberg-Marquardt batched over starts and bootstrap replicates (thousands of
small fits in one numpy loop), with box bounds by projection and Huber loss by iterative reweighting.
"""
from __future__ import annotations

from dataclasses import dataclass
import numpy as np

Z95 = 1.959964  # two-sided 95% quantile of the standard normal
BIG = 50.0  # bound of log-coefficients: e^50 covers any coefficient in float64 without overflow


@dataclass(frozen=True, kw_only=True)
class Law:
    """One functional form: its parameters, model in internal coordinates, starts, bounds and formula."""

    name: str
    """Form name as given to `fit(form=...)`."""
    params: tuple[str, ...]
    """Reported parameter names, in the order of the internal parameter vector."""
    n_inputs: int
    """Input columns: 1 (C) or 2 (N, D)."""
    huber_delta: float | None
    """Huber threshold on log residuals; None for plain least squares."""
    template: str
    """Formula with {param} placeholders and {y}, {x} names."""


POWER = Law(name="power", params=("A", "alpha"), n_inputs=1, huber_delta=None,
            template="{y} = {A:.4g} * {x}^({alpha:.4f})")
SATURATING = Law(name="saturating", params=("E_inf", "A", "alpha"), n_inputs=1, huber_delta=None,
                 template="{y} = {E_inf:.4g} + {A:.4g} * {x}^({alpha:.4f})")
# delta = 1e-3 on log residuals as Hoffmann et al. 2022 (approach 3): robust to outlying runs.
ND = Law(name="nd", params=("E0", "A", "a", "B", "b"), n_inputs=2, huber_delta=1e-3,
         template="{y} = {E0:.4g} + {A:.4g} / N^{a:.4f} + {B:.4g} / D^{b:.4f}")
LAWS = {law.name: law for law in (POWER, SATURATING, ND)}


def log_model(law: Law, theta: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log E and its Jacobian in internal coordinates.

    theta: (B, P) internal parameters (floors as they are, coefficients as logs at x0, exponents);
    u: (B, M, n_inputs) log(x / x0). Returns pred (B, M) and jac (B, M, P).
    """
    t = theta[:, None, :]  # (B, 1, P)
    if law is POWER:
        pred = t[..., 0] + t[..., 1] * u[..., 0]
        return pred, np.stack([np.ones_like(pred), u[..., 0]], axis=-1)
    if law is SATURATING:
        p = np.exp(t[..., 1] + t[..., 2] * u[..., 0])  # (B, M) the power-law term
        s = t[..., 0] + p
        return np.log(s), np.stack([1 / s, p / s, p * u[..., 0] / s], axis=-1)
    pa = np.exp(t[..., 1] - t[..., 2] * u[..., 0])  # (B, M) A / N^a
    pb = np.exp(t[..., 3] - t[..., 4] * u[..., 1])  # (B, M) B / D^b
    s = t[..., 0] + pa + pb
    return np.log(s), np.stack([1 / s, pa / s, -pa * u[..., 0] / s, pb / s, -pb * u[..., 1] / s], axis=-1)


def bounds(law: Law, y_min: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds (B, P) of the internal parameters; floors stay below the smallest error."""
    ones = np.ones_like(y_min)
    floor_hi = 0.999 * y_min
    if law is POWER:
        return np.stack([-BIG * ones, -10 * ones], -1), np.stack([BIG * ones, 10 * ones], -1)
    if law is SATURATING:  # alpha < 0: a floor only means something for a decreasing error
        return (np.stack([0 * ones, -BIG * ones, -10 * ones], -1),
                np.stack([floor_hi, BIG * ones, -1e-6 * ones], -1))
    return (np.stack([0 * ones, -BIG * ones, 1e-6 * ones, -BIG * ones, 1e-6 * ones], -1),
            np.stack([floor_hi, BIG * ones, 5 * ones, BIG * ones, 5 * ones], -1))


def starts(law: Law, u: np.ndarray, log_y: np.ndarray) -> np.ndarray:
    """A grid of starting points (S, P) for one data set; u: (M, n_inputs), log_y: (M,)."""
    y = np.exp(log_y)
    if law is POWER:
        return np.array([[log_y.mean(), 0.0]])
    if law is SATURATING:  # for each trial floor, the power law of what lies above it
        rows = []
        for frac in (0.0, 0.3, 0.6, 0.9):
            floor = frac * y.min()
            alpha, log_a = np.polyfit(u[:, 0], np.log(y - floor), 1)
            rows.append([floor, log_a, min(alpha, -1e-3)])
        return np.array(rows)
    grid = np.meshgrid([0.0, 0.5 * y.min()], np.log([0.1, 0.5]) + np.log(y.mean()), [0.1, 0.4, 1.0],
                       np.log([0.1, 0.5]) + np.log(y.mean()), [0.1, 0.4, 1.0], indexing="ij")
    return np.stack([g.ravel() for g in grid], axis=-1)


def to_reported(law: Law, theta: np.ndarray, x0: np.ndarray) -> dict[str, np.ndarray]:
    """Internal parameters (B, P) -> reported ones in raw units; x0: (n_inputs,) reference inputs."""
    if law is POWER:
        return {"A": np.exp(theta[:, 0]) * x0[0] ** -theta[:, 1], "alpha": theta[:, 1]}
    if law is SATURATING:
        return {"E_inf": theta[:, 0], "A": np.exp(theta[:, 1]) * x0[0] ** -theta[:, 2], "alpha": theta[:, 2]}
    return {"E0": theta[:, 0], "A": np.exp(theta[:, 1]) * x0[0] ** theta[:, 2], "a": theta[:, 2],
            "B": np.exp(theta[:, 3]) * x0[1] ** theta[:, 4], "b": theta[:, 4]}


def evaluate(law: Law, params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """E at raw inputs x: (M, n_inputs), for parameter arrays of shape (B,) -> (B, M)."""
    p = {k: np.asarray(v, dtype=np.float64).reshape(-1, 1) for k, v in params.items()}
    if law is POWER:
        return p["A"] * x[:, 0] ** p["alpha"]
    if law is SATURATING:
        return p["E_inf"] + p["A"] * x[:, 0] ** p["alpha"]
    return p["E0"] + p["A"] / x[:, 0] ** p["a"] + p["B"] / x[:, 1] ** p["b"]


def formula(law: Law, params: dict[str, float], *, y: str, x: str) -> str:
    """The fitted law as text, e.g. `1 - acc1 = 3.1 * compute_gmacs^(-0.1210)`."""
    return law.template.format(y=y, x=x, **{k: float(v) for k, v in params.items()})


def _cost(r: np.ndarray, w: np.ndarray, delta: float | None) -> np.ndarray:
    if delta is None:
        return 0.5 * (w * r * r).sum(-1)
    a = np.abs(r)
    return (w * np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))).sum(-1)


def solve(law: Law, u: np.ndarray, log_y: np.ndarray, w: np.ndarray, theta0: np.ndarray, *, lower: np.ndarray,
          upper: np.ndarray, huber_delta: float | None = None, max_iter: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Minimise sum_m w * rho(log_y - log_model) for B independent problems at once.

    u: (B, M, n_inputs) as in log_model; log_y, w: (B, M) (w = 0 drops a point, w = k counts it k
    times); theta0, lower, upper: (B, P). rho is the law's loss (squared error or Huber), or Huber
    with threshold huber_delta when given (a tiny one approaches least absolute deviations).
    Returns theta (B, P) and the final cost (B,). Converged problems leave the batch.
    """
    delta = law.huber_delta if huber_delta is None else huber_delta
    theta = np.clip(theta0, lower, upper)
    pred, jac = log_model(law, theta, u)
    r = log_y - pred
    cost = _cost(r, w, delta)
    lam = np.full(len(theta), 1e-3)
    eye = np.eye(theta.shape[1])
    i = np.arange(len(theta))  # problems still iterating
    for _ in range(max_iter):
        # Huber by reweighting: the gradient J^T (w psi(r)) equals J^T (w_irls r)
        w_irls = w[i] if delta is None else w[i] * np.minimum(1.0, delta / np.maximum(np.abs(r[i]), 1e-300))
        jw = jac[i] * w_irls[..., None]
        h = jw.transpose(0, 2, 1) @ jac[i]  # (b, P, P) Gauss-Newton Hessian
        g = (jw.transpose(0, 2, 1) @ r[i][..., None])[..., 0]  # (b, P)
        diag = np.einsum("bpp->bp", h) + 1e-12 * (1 + np.abs(h).max(axis=(1, 2)))[:, None]
        step = np.linalg.solve(h + lam[i, None, None] * diag[:, :, None] * eye, g[..., None])[..., 0]
        trial = np.clip(theta[i] + step, lower[i], upper[i])
        pred_t, jac_t = log_model(law, trial, u[i])
        r_t = log_y[i] - pred_t
        cost_t = _cost(r_t, w[i], delta)
        better = np.isfinite(cost_t) & (cost_t < cost[i])
        # converged: a Gauss-Newton-like step (small damping) that no longer gains, or no step gains at all
        done = (better & (cost[i] - cost_t <= 1e-9 * (cost_t + 1e-30)) & (lam[i] <= 1)) | (~better & (lam[i] >= 1e11))
        b = i[better]
        theta[b], r[b], jac[b], cost[b] = trial[better], r_t[better], jac_t[better], cost_t[better]
        lam[i] = np.clip(np.where(better, lam[i] / 3, lam[i] * 4), 1e-12, 1e12)
        i = i[~done]
        if not len(i):
            break
    return theta, cost
