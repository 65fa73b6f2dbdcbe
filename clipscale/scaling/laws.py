"""Functional forms of scaling laws, as pure functions of numpy arrays.

Power law in compute, E(C) = A * C^alpha with alpha < 0 for an error (Kaplan et al. 2020, eq. 1.3;
Cherti et al. 2023, "Reproducible scaling laws for contrastive language-image learning", sec. 3).
It is linear in log space, log E = log A + alpha log C, which is how it is fitted.
"""
from __future__ import annotations

import numpy as np


def power_law(c: np.ndarray, *, a: float, alpha: float) -> np.ndarray:
    """E(C) = a * C**alpha."""
    return a * np.power(c, alpha)


def fit_log_linear(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Least squares of log y = log a + alpha log x; returns (a, alpha). x, y: (N,), positive."""
    design = np.stack([np.ones_like(x), np.log(x)], axis=1)  # (N, 2)
    (log_a, alpha), *_ = np.linalg.lstsq(design, np.log(y), rcond=None)
    return float(np.exp(log_a)), float(alpha)


def r2_log(x: np.ndarray, y: np.ndarray, *, a: float, alpha: float) -> float:
    """Coefficient of determination in log space."""
    residual = np.log(y) - np.log(power_law(x, a=a, alpha=alpha))
    total = np.log(y) - np.log(y).mean()
    return float(1 - (residual @ residual) / (total @ total)) if total @ total > 0 else float("nan")


def formula(*, a: float, alpha: float, y: str, x: str) -> str:
    return f"{y} = {a:.4g} * {x}^({alpha:.4f})"
