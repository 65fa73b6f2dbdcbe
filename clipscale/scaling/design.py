"""Experiment design: which runs to train next so that a law's prediction at a target is sharpest.

    from clipscale import scaling
    [f] = scaling.fit(df, metric="acc1", form="nd")
    d = scaling.design(f, target=1e12, candidates=candidates_from_recipe("grid.toml"), budget=5e11)  # .design module
    print(d.table()); d.plot(ax); Path("next.toml").write_text(d.recipe("grid.toml"))

Method (preposterior analysis by simulation, chosen greedily under the budget): the fit's bootstrap
replicates stand for what the law may be. To value a candidate run, draw S possible outcomes of it,
each from one replicate's law plus a resampled log residual of the fit (the runs already chosen drawn
from the same replicate, jointly), and refit the law to the data plus each outcome (the frontier
re-selected, as `fit` does). By the law of total variance, the variance of log E at the target
that the run is expected to remove is the variance of the refitted predictions over the outcomes;
what remains is today's variance (the bootstrap's, as IQR/1.349 so that a few wild replicates of a
small grid do not set it) less that. The candidate removing the most per unit cost is chosen and
the search repeats until the budget is spent (run twice: by gain per cost and by gain alone,
keeping the better end). Widths are those of 95% normal intervals in log space:
the confidence interval of the law, and the prediction interval that adds the runs' own noise. All
S x K refits of a round are one call of the batched solver, and every candidate sees the same
draws (common random numbers), so their comparison is not drowned in simulation noise.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from clipscale.scaling.fit import Fit, _optimal_log_split, _resampled, _select, _solve
from clipscale.scaling import laws
from clipscale.scaling.results import FitError


@dataclass(frozen=True, kw_only=True)
class Candidate:
    """A run that could be trained next."""

    name: str
    """Label, e.g. `w128-48k` (the sweep entry's name)."""
    params: float
    """Parameters of the model (image + text towers)."""
    samples_seen: float
    """Training length in samples."""
    gmacs_per_sample: float
    """Forward GMACs per image-text pair: compute_gmacs = gmacs_per_sample * samples_seen."""
    cost: float
    """What it costs, in the budget's unit (compute_gmacs or GPU-hours)."""
    overrides: tuple[str, ...] = ()
    """Dotted recipe overrides (`key=TOML value`) that train it."""

    def inputs(self, axis: str) -> list[float]:
        """The law's inputs for this run: (params, samples_seen) for nd, else its value on the axis."""
        if axis == "nd":
            return [self.params, self.samples_seen]
        return [{"compute_gmacs": self.gmacs_per_sample * self.samples_seen, "params": self.params,
                 "samples_seen": self.samples_seen}[axis]]


@dataclass(frozen=True, kw_only=True)
class Design:
    """The runs to train next, in order, each with the expected target interval after it."""

    target: float
    """The budget (in the fit's x units) whose predicted error the design sharpens."""
    x: str
    y: str
    form: str
    budget: float
    budget_unit: str
    start_ci95: list[float]
    """The target's 95% confidence interval now (by the design's own bootstrap)."""
    start_pi95: list[float]
    """The target's 95% prediction interval now (by the design's own bootstrap)."""
    steps: list[dict[str, Any]]
    """Per chosen run: candidate, cost, cumulative cost, expected CI and PI widths after it."""
    first_round: list[dict[str, Any]]
    """Every candidate's expected CI and PI widths if it alone were trained next (the first greedy round)."""
    notes: list[str] = field(default_factory=list)

    @property
    def chosen(self) -> list[Candidate]:
        return [Candidate(**{**s["candidate"], "overrides": tuple(s["candidate"]["overrides"])}) for s in self.steps]

    def table(self) -> str:
        """The chosen runs as a table for the terminal."""
        (lo, hi), (clo, chi) = self.start_pi95, self.start_ci95
        lines = [f"target {self.x}={self.target:.4g}: {self.y} now 95% PI [{lo:.4g}, {hi:.4g}] (width {hi - lo:.4g}), "
                 f"CI width {chi - clo:.4g}; budget {self.budget:.4g} {self.budget_unit}",
                 f"{'#':>2} {'run':24s} {'params':>10s} {'samples':>10s} {'cost':>10s} {'total':>10s} "
                 f"{'E[CI width]':>11s} {'E[PI width]':>11s}"]
        for i, s in enumerate(self.steps, 1):
            c = s["candidate"]
            lines.append(f"{i:>2} {c['name']:24s} {c['params']:>10.4g} {c['samples_seen']:>10.4g} {c['cost']:>10.4g} "
                         f"{s['cumulative_cost']:>10.4g} {s['expected_ci95_width']:>11.4g} "
                         f"{s['expected_pi95_width']:>11.4g}")
        if not self.steps:
            lines.append("   no candidate fits the budget")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def recipe(self, base: str | Path | None = None, *, name: str = "design") -> str:
        """A recipe whose `[sweep]` trains the chosen runs in order: the base recipe's settings (its own
        [sweep] table removed) and one sweep axis `design` with an entry per run."""
        text = f'[run]\nname = "{name}"' if base is None else _without_sweep(Path(base).read_text())
        entries = []
        for i, c in enumerate(self.chosen, 1):
            pairs = [f'name = "{i:02d}-{c.name}"'] + [f'"{k}" = {v}' for k, v in (o.split("=", 1) for o in c.overrides)]
            entries.append(f"  {{ {', '.join(pairs)} }},")
        header = (f"# clipscale design: the {len(entries)} runs that most narrow the 95% prediction interval of "
                  f"{self.y} at {self.x}={self.target:.4g}\n# ({self.form} law), in order, within {self.budget:.4g} "
                  f"{self.budget_unit}. Train them with `clipscale sweep` (name = \"{name}\").\n")
        return f"{header}{text.rstrip()}\n\n[sweep]\n{name} = [\n" + "\n".join(entries) + "\n]\n"

    def plot(self, ax: Any) -> None:
        """Expected widths of the target's 95% PI and CI against cumulative cost, a marker per chosen run."""
        cost = [0.0] + [s["cumulative_cost"] for s in self.steps]
        for kind, start, color in (("pi", self.start_pi95, "C0"), ("ci", self.start_ci95, "C1")):
            width = [start[1] - start[0]] + [s[f"expected_{kind}95_width"] for s in self.steps]
            label = "PI (law + run noise)" if kind == "pi" else "CI (law)"
            ax.plot(cost, width, "o-", color=color, label=label)
        for c, s in zip(cost[1:], self.steps):
            ax.annotate(s["candidate"]["name"], (c, s["expected_pi95_width"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel(f"cumulative cost ({self.budget_unit})")
        ax.set_ylabel(f"expected 95% width of {self.y} at {self.x}={self.target:.3g}")
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _without_sweep(text: str) -> str:
    """Recipe text without its [sweep] table (from its header to the next table or the end)."""
    out, skipping = [], False
    for line in text.splitlines():
        if line.strip().startswith("["):
            skipping = line.strip() == "[sweep]"
        if not skipping:
            out.append(line)
    return "\n".join(out)


def fit_data(f: Fit) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rows a fit was made from: inputs x (N, k), errors y (N,), run index (N,) for the bootstrap."""
    if f.law is laws.ND:
        rows = f.points  # nd fits every point: its points are the rows, with their params and samples_seen
        x = np.array([[p["params"], p["samples_seen"]] for p in rows], dtype=np.float64)
    else:
        rows = [p for p in f.all_points if not p.get("held_out")]
        x = np.array([[p["x"]] for p in rows], dtype=np.float64)
    runs = [p.get("run") for p in rows]
    units = np.unique(runs, return_inverse=True)[1] if all(r is not None for r in runs) else np.arange(len(rows))
    return x, np.array([p["y"] for p in rows], dtype=np.float64), units


def log_error_at(f: Fit, params: dict[str, np.ndarray], target: float) -> np.ndarray:
    """log E at the target (the compute-optimal allocation for nd) for parameter arrays (R,) -> (R,)."""
    if f.law is not laws.ND:
        return np.log(laws.evaluate(f.law, params, np.array([[target]]))[:, 0])
    log_n, log_d = _optimal_log_split(params, np.array([target / f.gmacs_per_param_sample]))
    e = params["E0"] + np.exp(np.log(params["A"]) - params["a"] * log_n[:, 0]) + \
        np.exp(np.log(params["B"]) - params["b"] * log_d[:, 0])
    return np.log(e)


class _Simulator:
    """The target's log-error uncertainty now and its expected reduction by new runs (batched refits)."""

    def __init__(self, f: Fit, *, target: float, draws: int, n_bootstrap: int, seed: int):
        self.f, self.target, self.law = f, target, f.law
        self.x, self.y, self.units = fit_data(f)
        self.n_units = int(self.units.max()) + 1
        rng = np.random.default_rng(seed)
        replicates = {k: np.asarray(v) for k, v in f.bootstrap.items()}
        pick = rng.integers(0, len(next(iter(replicates.values()))), draws)
        self.draw_params = {k: v[pick] for k, v in replicates.items()}  # (S,) each, replicate by replicate
        self.draw_noise_u = rng.random((draws, 64))  # residual choices for up to 64 new runs, shared by candidates
        self.residuals = np.asarray(f.log_residuals)
        x_fit, rows = _select(self.x, self.y, f.frontier)
        self.x0 = np.exp(np.log(x_fit).mean(axis=0))  # the reference inputs fit_points would use
        theta0 = laws.starts(self.law, np.log(x_fit / self.x0), np.log(self.y[rows]))
        s, m = len(theta0), len(rows)
        thetas, costs = _solve(self.law, np.broadcast_to(x_fit, (s, *x_fit.shape)),
                               np.broadcast_to(self.y[rows], (s, m)), np.ones((s, m)), theta0, x0=self.x0,
                               huber_delta=f.huber_delta)
        self.theta = thetas[np.nanargmin(costs)]
        counts = np.zeros((n_bootstrap, self.n_units))
        np.add.at(counts, (np.arange(n_bootstrap)[:, None], rng.integers(0, self.n_units, counts.shape)), 1)
        boot = self._log_errors([(self.x, self.y)], counts[:, self.units])[0]
        q25, q75 = np.nanpercentile(boot, [25, 75])
        self.center = float(self._log_errors([(self.x, self.y)], np.ones((1, len(self.y))))[0, 0])
        self.var_now = ((q75 - q25) / 1.349) ** 2  # robust: a few wild replicates of a small grid do not set it
        self.var_noise = float(np.mean(self.residuals ** 2))

    def _log_errors(self, data: list[tuple[np.ndarray, np.ndarray]], counts: np.ndarray) -> np.ndarray:
        """log E at the target fitted to each data set (x (N, k), y (N,)) under each row of row
        counts (R, N): (len(data), R); NaN where fewer points than parameters remain (as fit_points
        drops such replicates). Frontiers are re-selected in every fit."""
        parts = [_resampled(x, y, counts, self.f.frontier) for x, y in data]
        bx, by, bw = (np.concatenate([p[i] for p in parts]) for i in range(3))
        ok = (bw > 0).sum(axis=1) >= len(self.law.params)
        theta, _ = _solve(self.law, bx, by, bw, np.tile(self.theta, (len(bx), 1)), x0=self.x0,
                          huber_delta=self.f.huber_delta)
        log_e = log_error_at(self.f, laws.to_reported(self.law, theta, self.x0), self.target)
        return np.where(ok, log_e, np.nan).reshape(len(data), -1)

    def outcomes(self, new_x: np.ndarray) -> np.ndarray:
        """Simulated errors (S, M) of new runs at inputs new_x (M, k): a replicate's law + a residual."""
        e = laws.evaluate(self.law, self.draw_params, new_x)  # (S, M)
        pick = (self.draw_noise_u[:, : len(new_x)] * len(self.residuals)).astype(int)
        return np.minimum(e * np.exp(self.residuals[pick]), 0.999)

    def variance_after(self, scenarios: list[np.ndarray]) -> np.ndarray:
        """Expected variance of log E at the target once the runs of each scenario (inputs (M, k), the
        same M in all) are trained: the variance now less the variance, over simulated outcomes, of
        the refitted prediction (the law of total variance)."""
        data = [(np.r_[self.x, new_x], np.r_[self.y, y_new]) for new_x in scenarios for y_new in self.outcomes(new_x)]
        log_e = self._log_errors(data, np.ones((1, len(data[0][1])))).reshape(len(scenarios), -1)  # (K, S)
        return np.maximum(self.var_now - np.nanvar(log_e, axis=1, ddof=1), 0.0)

    def widths(self, var: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """95% CI and PI widths of E at the target for variances of log E."""
        ci = np.exp(self.center) * 2 * np.sinh(laws.Z95 * np.sqrt(var))
        pi = np.exp(self.center) * 2 * np.sinh(laws.Z95 * np.sqrt(var + self.var_noise))
        return ci, pi


def design(f: Fit, *, target: float, candidates: Sequence[Candidate], budget: float,
           budget_unit: str = "compute_gmacs", draws: int = 128, n_bootstrap: int = 400, max_runs: int = 20,
           seed: int = 0) -> Design:
    """The runs, among `candidates`, to train next (in order, within `budget`) that most narrow the
    expected 95% interval of the error at `target` (see the module docstring)."""
    if not candidates:
        raise FitError("design needs at least one candidate run (a recipe's [sweep] grid or --candidate)")
    if not target > 0 or not budget > 0:
        raise FitError(f"target={target} and budget={budget} must be positive")
    if f.law is laws.ND and not f.gmacs_per_param_sample:
        raise FitError("this nd fit lacks gmacs_per_param_sample (an old fits.json): refit with `clipscale fit`")
    axis = "nd" if f.law is laws.ND else f.x
    sim = _Simulator(f, target=target, draws=draws, n_bootstrap=n_bootstrap, seed=seed)
    inputs = np.array([c.inputs(axis) for c in candidates], dtype=np.float64)  # (K, k)
    costs = np.array([c.cost for c in candidates], dtype=np.float64)
    # Greedy by shrink per cost can spend the budget on cheap runs and miss one large run worth more;
    # greedy by shrink alone misses the reverse. Both run and the smaller final variance is kept (the
    # usual guard of greedy knapsack).
    runs = [_greedy(sim, inputs, costs, budget=budget, per_cost=p, max_runs=max_runs) for p in (True, False)]
    chosen, variances, first = min(runs, key=lambda r: r[1][-1] if r[1] else sim.var_now)
    steps, spent = [], 0.0
    for i, var in zip(chosen, variances):
        spent += costs[i]
        ci, pi = sim.widths(var)
        steps.append({"candidate": asdict(candidates[i]), "cost": float(costs[i]), "cumulative_cost": spent,
                      "expected_ci95_width": float(ci), "expected_pi95_width": float(pi)})
    first_round = [{"candidate": asdict(candidates[i]), **dict(zip(("expected_ci95_width", "expected_pi95_width"),
                                                                   map(float, sim.widths(var))))} for i, var in first]
    notes = []
    if f.law is not laws.ND and f.frontier != "none":
        notes.append("a law on the frontier assumes every candidate lands on the frontier; an nd fit values "
                     "model size and samples seen separately")
    half = [np.exp(sim.center - laws.Z95 * np.sqrt(v)) for v in (sim.var_now, sim.var_now + sim.var_noise)]
    return Design(target=float(target), x=f.x, y=f.y, form=f.form, budget=float(budget), budget_unit=budget_unit,
                  start_ci95=[float(half[0]), float(np.exp(2 * sim.center) / half[0])],
                  start_pi95=[float(half[1]), float(np.exp(2 * sim.center) / half[1])],
                  steps=steps, first_round=first_round, notes=notes)


def _greedy(sim: _Simulator, inputs: np.ndarray, costs: np.ndarray, *, budget: float, per_cost: bool,
            max_runs: int) -> tuple[list[int], list[float], list[tuple[int, float]]]:
    """Chosen candidate indices, the expected variance of log E at the target after each, and the
    first round's variances."""
    chosen, variances, first, spent, var = [], [], [], 0.0, sim.var_now
    while len(chosen) < max_runs:
        todo = [i for i in range(len(costs)) if i not in chosen and spent + costs[i] <= budget]
        if not todo:
            break
        after = sim.variance_after([inputs[chosen + [i]] for i in todo])
        first = first or [(i, float(v)) for i, v in zip(todo, after)]
        best = int(np.argmax((var - after) / (costs[todo] if per_cost else 1.0)))
        chosen.append(todo[best])  # the budget is spent: a run never adds variance, a gain <= 0 is simulation noise
        spent += costs[todo[best]]
        var = min(var, float(after[best]))
        variances.append(var)
    return chosen, variances, first


def budget_cost(*, samples_seen: float, gmacs_per_sample: float, flops_per_sample: float | None, unit: str,
                peak_tflops: float, mfu: float) -> float:
    """A run's cost: compute_gmacs, or GPU-hours at `mfu` of `peak_tflops` (plan's throughput model:
    model FLOPs per sample, forward and backward, over the achieved FLOP/s)."""
    if unit == "compute_gmacs":
        return gmacs_per_sample * samples_seen
    if unit == "gpu_hours":
        return flops_per_sample * samples_seen / (peak_tflops * 1e12 * mfu) / 3600
    raise FitError(f"budget unit {unit!r} must be compute_gmacs or gpu_hours")


def candidate_from_overrides(name: str, recipe: str | Path | None, overrides: Sequence[str], *, unit: str,
                             peak_tflops: float = 989.0, mfu: float = 0.4) -> Candidate:
    """The candidate a recipe (or the defaults) plus overrides trains: its params and GMACs counted
    on the meta device, its cost in `unit`."""
    from clipscale.compute import model_compute, model_flops_per_sample  # torch: only when counting
    from clipscale.config import SWEEP_POINT, load_config

    cfg = load_config(recipe, [SWEEP_POINT, *overrides] if recipe else list(overrides))
    c = model_compute(cfg.model)
    samples = cfg.train.total_samples
    cost = budget_cost(samples_seen=samples, gmacs_per_sample=c.gmacs_per_sample.total, unit=unit,
                       flops_per_sample=model_flops_per_sample(cfg.model) if unit == "gpu_hours" else None,
                       peak_tflops=peak_tflops, mfu=mfu)
    return Candidate(name=name, params=float(c.params.total), samples_seen=float(samples),
                     gmacs_per_sample=c.gmacs_per_sample.total, cost=cost, overrides=tuple(overrides))


def candidates_from_recipe(recipe: str | Path, *, unit: str = "compute_gmacs", peak_tflops: float = 989.0,
                           mfu: float = 0.4) -> list[Candidate]:
    """One candidate per point of the recipe's [sweep] grid (config.load_sweep), named by its entries."""
    from clipscale.config import SWEEP_POINT, load_config, load_sweep

    base = load_config(recipe, [SWEEP_POINT]).run.name
    out = []
    for name, overrides in load_sweep(recipe):
        keep = [o for o in overrides if o != SWEEP_POINT and not o.startswith("run.name=")]
        out.append(candidate_from_overrides(name.removeprefix(base + "-"), recipe, keep, unit=unit,
                                            peak_tflops=peak_tflops, mfu=mfu))
    return out


def parse_candidate(spec: str, recipe: str | Path | None, *, unit: str, peak_tflops: float = 989.0,
                    mfu: float = 0.4) -> Candidate:
    """`model=ViT-B-32,samples=3e9[,KEY=VALUE...]` (dotted overrides besides) -> a Candidate."""
    fields = dict(part.split("=", 1) for part in spec.split(",") if "=" in part)
    if "model" not in fields or "samples" not in fields or spec.count("=") != len(fields):
        raise FitError(f"--candidate {spec!r} must look like model=ViT-B-32,samples=3e9 (more dotted overrides "
                       f"may follow, e.g. ,model.vision_width=128)")
    model, label = fields.pop("model"), fields.pop("samples")
    try:
        samples = int(float(label))
    except ValueError:
        raise FitError(f"--candidate {spec!r}: samples must be a number of samples seen, e.g. 3e9") from None
    overrides = [f'model.name="{model}"', f"train.total_samples={samples}", *(f"{k}={v}" for k, v in fields.items())]
    name = "-".join([model, label, *(str(v) for v in fields.values())])  # e.g. ViT-B-32-3e9: the run's label
    return candidate_from_overrides(name, recipe, overrides, unit=unit, peak_tflops=peak_tflops, mfu=mfu)
