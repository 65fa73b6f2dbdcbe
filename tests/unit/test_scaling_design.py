"""clipscale design: chosen runs narrow the target interval more than a grid of the same cost; the
recipe it writes is a sweep clipscale runs as it is; the CLI and its input errors."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmarks.design import one
from clipscale.cli import main
from clipscale.config import load_config, load_sweep
from clipscale.scaling import Candidate, FitError, design, fit
from clipscale.scaling.design import parse_candidate
from tests.scaling_rows import law_rows, write_jsonl

RECIPES = Path(__file__).parents[2] / "recipes"


def test_design_narrows_the_target_interval_more_than_a_grid_of_the_same_cost():
    # the saturating law (benchmarks/design.py has every form, 20 seeds each): a small pilot, a floor to find
    results = [one("saturating", seed) for seed in range(3)]
    ratios = [r["design"]["ci_width"] / r["grid"]["ci_width"] for r in results]
    assert np.median(ratios) < 0.9, ratios
    assert all(r["cost"] <= 1.0001 * r["grid_cost"] for r in results)


def nd_fit():
    rows = law_rows(seed=0, params=(1e6, 4e6, 1.6e7), samples=(1e7, 3e7, 1e8), checkpoints=1)
    [f] = fit(pd.DataFrame(rows), metric="acc1", form="nd", n_bootstrap=200)
    return f


def test_the_recipe_it_writes_is_a_sweep_of_the_chosen_runs_in_order(tmp_path):
    f = nd_fit()
    cands = [Candidate(name=f"n{n:.0e}-d{d:.0e}", params=n, samples_seen=d, gmacs_per_sample=2e-9 * n,
                       cost=2e-9 * n * d, overrides=(f"model.vision_width={int(n / 1e5)}", f"train.total_samples={int(d)}"))
             for n in (4e6, 1.6e7, 6.4e7) for d in (1e8, 1e9)]
    d = design(f, target=2e-9 * 2.56e8 * 4e9, candidates=cands, budget=2e-9 * 6.4e7 * 1e9, draws=8, n_bootstrap=60)
    assert d.steps and sum(s["cost"] for s in d.steps) <= d.budget
    widths = [s["expected_ci95_width"] for s in d.steps]
    assert widths == sorted(widths, reverse=True) and widths[0] < d.start_ci95[1] - d.start_ci95[0]
    path = tmp_path / "next.toml"
    path.write_text(d.recipe(RECIPES / "scaling_tiny.toml"))
    runs = load_sweep(path)
    assert [name for name, _ in runs] == [f"scaling_tiny-{i:02d}-{c.name}" for i, c in enumerate(d.chosen, 1)]
    for (_, overrides), c in zip(runs, d.chosen):
        cfg = load_config(path, overrides)
        assert cfg.train.total_samples == c.samples_seen and cfg.model.vision_width == int(c.params / 1e5)
        assert cfg.optim.lr_peak == 2e-3  # the base recipe's settings stay


def test_cli_design_from_results_and_a_grid_recipe(tmp_path, capsys):
    rows = law_rows(seed=0, params=(1e6, 4e6, 1.6e7), samples=(1e7, 3e7, 1e8), checkpoints=1)
    results = write_jsonl(tmp_path / "results.jsonl", rows)
    grid = tmp_path / "grid.toml"
    grid.write_text((RECIPES / "scaling_tiny.toml").read_text())
    assert main(["design", str(results), "--form", "power", "--frontier", "none", "--recipe", str(grid),
                 "--target", "1e9", "--budget", "3e4", "--out", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "target compute_gmacs=1e+09" in out and "clipscale sweep" in out
    d = json.loads((tmp_path / "d" / "design.json").read_text())
    assert sum(s["cost"] for s in d["steps"]) <= 3e4 and (tmp_path / "d" / "design.png").stat().st_size > 0
    chosen = [name for name, _ in load_sweep(tmp_path / "d" / "design.toml")]
    assert len(chosen) == len(d["steps"]) >= 1


def test_bad_candidates_and_budgets_are_refused_with_the_fix():
    with pytest.raises(FitError, match=r"--candidate 'ViT-B-32' must look like model=ViT-B-32,samples=3e9"):
        parse_candidate("ViT-B-32", None, unit="compute_gmacs")
    with pytest.raises(FitError, match="samples must be a number of samples seen"):
        parse_candidate("model=ViT-B-32,samples=lots", None, unit="compute_gmacs")
    with pytest.raises(FitError, match="budget unit 'dollars' must be compute_gmacs or gpu_hours"):
        parse_candidate("model=clipscale-tiny,samples=1e4", None, unit="dollars")
    f = nd_fit()
    with pytest.raises(FitError, match="design needs at least one candidate"):
        design(f, target=1e9, candidates=[], budget=1.0)
    with pytest.raises(FitError, match="must be positive"):
        design(f, target=1e9, candidates=[Candidate(name="a", params=1e6, samples_seen=1e7, gmacs_per_sample=1.0,
                                                    cost=1.0)], budget=0.0)


def test_a_candidate_costs_compute_or_gpu_hours_through_plans_throughput_model():
    c = parse_candidate("model=clipscale-tiny,samples=1e4,model.vision_width=64", None, unit="gpu_hours",
                        peak_tflops=100.0, mfu=0.5)
    g = parse_candidate("model=clipscale-tiny,samples=1e4,model.vision_width=64", None, unit="compute_gmacs")
    assert g.cost == pytest.approx(g.gmacs_per_sample * 1e4)
    # training FLOPs = 3 x forward (2 FLOPs per MAC) per sample, at 50% of 100 TFLOP/s
    assert c.cost == pytest.approx(6e9 * g.gmacs_per_sample * 1e4 / (100e12 * 0.5) / 3600, rel=1e-6)
    assert c.overrides == ('model.name="clipscale-tiny"', "train.total_samples=10000", "model.vision_width=64")
    assert c.name == "clipscale-tiny-1e4-64"


def test_one_large_run_is_not_crowded_out_by_cheap_ones():
    # a power law on 6 runs over two decades, target two decades beyond: cheap runs inside the range
    # are each worth much per unit cost, but together far less than the one run near the target
    rng = np.random.default_rng(0)
    c = np.geomspace(1.0, 100.0, 6)
    rows = [{"run": f"r{i}", "model": "m", "compute_gmacs": x, "dataset": "d", "task": "zeroshot_classification",
             "eval_dataset": "e", "metric": "acc1", "value": 1 - 0.9 * x ** -0.12 * np.exp(rng.normal(0, 0.03))}
            for i, x in enumerate(c)]
    [f] = fit(pd.DataFrame(rows), metric="acc1", form="power", frontier="none")
    cheap = [Candidate(name=f"cheap{k}", params=1.0, samples_seen=k, gmacs_per_sample=1.0, cost=k) for k in (2, 3, 5, 7)]
    far = Candidate(name="far", params=1.0, samples_seen=1e3, gmacs_per_sample=1.0, cost=1e3)
    d = design(f, target=1e4, candidates=[*cheap, far], budget=1e3)
    assert [c.name for c in d.chosen] == ["far"]


def test_cli_design_without_results_or_candidates_says_what_to_pass(tmp_path, capsys):
    assert main(["design", "--target", "1e9", "--budget", "1e4", "--candidate", "model=ViT-B-32,samples=1e9"]) == 2
    assert "design needs results (files, run directories, globs) or --fits" in capsys.readouterr().err
    results = write_jsonl(tmp_path / "results.jsonl", law_rows(checkpoints=1))
    assert main(["design", str(results), "--target", "1e9", "--budget", "1e4"]) == 2
    assert "design needs candidates: --recipe GRID.toml" in capsys.readouterr().err
