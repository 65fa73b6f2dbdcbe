"""Honesty of the bootstrap intervals: over 50 noisy draws from a known law, each true parameter lies
inside its 95% interval in at least 43 of them, for each form.

Over 300 other seeds the measured coverage was 94.7-95.7% (power), 91.7-92.7% (saturating), over 100 97-99% (nd);
a binomial count of 50 draws at 92% falls below 45 about a third of the time, so the bar is 43
(86%): it still fails for intervals that cover 80% or less, e.g. a bootstrap that ignores part of the noise.
"""
import numpy as np
import pytest

from clipscale.scaling.fit import Fit, fit_points

SEEDS = 50


def power(rng):
    x = np.geomspace(1e6, 1e10, 30)
    return x[:, None], 3.0 * x ** -0.2 * np.exp(rng.normal(0, 0.03, x.size)), {"A": 3.0, "alpha": -0.2}


def saturating(rng):
    x = np.geomspace(1e6, 1e11, 40)
    y = (0.15 + 20 * x ** -0.25) * np.exp(rng.normal(0, 0.02, x.size))
    return x[:, None], y, {"E_inf": 0.15, "A": 20.0, "alpha": -0.25}


def nd(rng):
    n, d = (g.ravel() for g in np.meshgrid(np.geomspace(1e6, 1e9, 6), np.geomspace(1e7, 1e10, 6)))
    y = (0.1 + 30 / n ** 0.35 + 50 / d ** 0.3) * np.exp(rng.normal(0, 0.02, n.size))
    return np.stack([n, d], axis=1), y, {"E0": 0.1, "A": 30.0, "a": 0.35, "B": 50.0, "b": 0.3}


@pytest.mark.parametrize(("form", "draw"), [("power", power), ("saturating", saturating), ("nd", nd)])
def test_95_percent_intervals_cover_the_true_parameters(form, draw):
    covered = {}
    for seed in range(SEEDS):
        x, y, truth = draw(np.random.default_rng(seed))
        ci = fit_points(x, y, form=form, frontier="none", n_bootstrap=200, seed=seed)["ci95"]
        for k, v in truth.items():
            covered[k] = covered.get(k, 0) + int(ci[k][0] <= v <= ci[k][1])
    assert all(c >= 43 for c in covered.values()), covered


def test_95_percent_prediction_intervals_cover_new_points():
    covered = 0
    for seed in range(SEEDS):
        rng = np.random.default_rng(seed)
        x, y, _ = power(rng)
        r = fit_points(x, y, form="power", frontier="none", n_bootstrap=200, seed=seed)
        f = Fit(group={}, form="power", frontier="none", x="compute_gmacs", y="1 - acc1", params=r["params"],
                ci95=r["ci95"], n_points=len(y), points=[], all_points=[], bootstrap=r["bootstrap"],
                log_residuals=r["log_residuals"])
        new_x = 10 ** rng.uniform(6, 10)
        new_y = 3.0 * new_x ** -0.2 * np.exp(rng.normal(0, 0.03))
        lo, hi = f.interval([new_x], kind="prediction")
        covered += int(lo[0] <= new_y <= hi[0])
    assert covered >= 43
