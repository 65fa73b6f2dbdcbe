"""Scaling laws: functional forms, frontiers, fits with bootstrap intervals, plots and planning.

    from clipscale import scaling
    df = scaling.load_results(["runs/*/", "published.csv"])
    fits = scaling.fit(df, metric="acc1", eval_dataset="imagenet1k", form="power", by=["dataset"])
    losses = scaling.fit(df, metric="loss", form="nd")  # errors named as such are fitted as they are
"""
from clipscale.scaling.design import Candidate, Design, design
from clipscale.scaling.fit import Fit, fit
from clipscale.scaling.forecast import Forecast, forecast
from clipscale.scaling.report import fit_results, format_fits, format_plan, read_fits
from clipscale.results import load_results
from clipscale.scaling.results import FitError

__all__ = ["Candidate", "Design", "Fit", "FitError", "Forecast", "design", "fit", "fit_results", "forecast",
           "format_fits", "format_plan", "load_results", "read_fits"]
