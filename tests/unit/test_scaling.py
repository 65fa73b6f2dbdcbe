import json
from itertools import product

import numpy as np
import pytest

from clipscale.scaling.fit import fit_power_law, fit_results, pareto_frontier
from clipscale.scaling.laws import fit_log_linear


def test_recovers_a_known_law_and_its_interval_covers_it():
    rng = np.random.default_rng(0)
    x = np.geomspace(1e2, 1e6, 25)
    y = 3.0 * x ** -0.25 * np.exp(rng.normal(0, 0.02, x.size))  # 2% multiplicative noise
    fit = fit_power_law(x, y, n_bootstrap=500)
    assert fit["alpha"] == pytest.approx(-0.25, abs=0.01)
    assert fit["A"] == pytest.approx(3.0, rel=0.1)
    assert fit["alpha_ci95"][0] < -0.25 < fit["alpha_ci95"][1]
    assert fit["A_ci95"][0] < 3.0 < fit["A_ci95"][1]
    assert fit["r2_log"] > 0.99


def test_log_linear_fit_equals_closed_form_least_squares():
    rng = np.random.default_rng(1)
    x, y = rng.uniform(1, 1e4, 10), rng.uniform(0.1, 1, 10)
    lx, ly = np.log(x), np.log(y)
    slope = ((lx - lx.mean()) @ (ly - ly.mean())) / ((lx - lx.mean()) @ (lx - lx.mean()))
    intercept = ly.mean() - slope * lx.mean()
    a, alpha = fit_log_linear(x, y)
    assert alpha == pytest.approx(slope, rel=1e-12)
    assert np.log(a) == pytest.approx(intercept, rel=1e-12, abs=1e-12)


def test_frontier_matches_brute_force():
    rng = np.random.default_rng(2)
    x, y = rng.integers(1, 20, 40).astype(float), rng.uniform(0, 1, 40)
    front = set(pareto_frontier(x, y).tolist())
    brute = {i for i in range(40)
             if all(not (x[j] <= x[i] and y[j] <= y[i] and (x[j], y[j], j) < (x[i], y[i], i)) for j in range(40))}
    assert front == brute


def write_results(directory, rows):
    directory.mkdir(parents=True)
    (directory / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def test_fit_results_writes_fits_and_plot(tmp_path):
    runs = []
    for width, steps in product([1, 2, 4], [1, 3]):
        rows = [{"run": f"w{width}-s{steps}", "step": s, "train_compute_gmacs": 10.0 * width * s,
                 "zeroshot_top1": 1 - 0.9 * (10.0 * width * s) ** -0.2 * (1 + 0.05 / width)} for s in range(1, steps + 1)]
        runs.append(write_results(tmp_path / f"w{width}-s{steps}", rows))
    fits = fit_results(runs, metric="zeroshot_top1", out_dir=tmp_path / "fit")
    on_disk = json.loads((tmp_path / "fit" / "fits.json").read_text())
    assert on_disk["alpha"] == pytest.approx(fits["alpha"])
    assert {"A", "alpha", "A_ci95", "alpha_ci95", "r2_log", "frontier", "points", "formula"} <= set(on_disk)
    assert on_disk["higher_is_better"] and on_disk["y"] == "1 - zeroshot_top1"
    assert -0.3 < fits["alpha"] < -0.1
    png = (tmp_path / "fit" / "fit.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000


def test_fit_errors_name_the_problem(tmp_path):
    run = write_results(tmp_path / "r", [{"run": "r", "step": 1, "train_compute_gmacs": 1.0, "zeroshot_top1": 0.5}])
    with pytest.raises(ValueError, match="has no field 'retrieval_r1'"):
        fit_results([run], metric="retrieval_r1", out_dir=tmp_path / "f")
    with pytest.raises(ValueError, match="at least 2 distinct x"):
        fit_results([run], out_dir=tmp_path / "f")
    with pytest.raises(ValueError, match="no results at .*missing"):
        fit_results([tmp_path / "missing"], out_dir=tmp_path / "f")
    assert not (tmp_path / "f" / "fits.json").exists()


def test_only_final_checkpoints_are_fitted_unless_asked(tmp_path):
    rows = {f"r{k}": [{"run": f"r{k}", "step": s, "train_compute_gmacs": 10.0 * k * s,
                      "zeroshot_top1": 1 - (10.0 * k * s) ** -0.3} for s in (1, 2, 3)] for k in (1, 5, 25)}
    runs = [write_results(tmp_path / name, r) for name, r in rows.items()]
    final = fit_results(runs, out_dir=tmp_path / "final")
    assert [(p["run"], p["step"]) for p in final["frontier"]] == [("r1", 3), ("r5", 3), ("r25", 3)]
    every = fit_results(runs, out_dir=tmp_path / "all", checkpoints="all")
    assert len(every["frontier"]) > 3 and len(final["points"]) == len(every["points"]) == 9
