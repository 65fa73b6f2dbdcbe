"""clipscale forecast: the annealing-law areas, forecasts on a synthetic grid, the on/off-law verdict, the CLI."""
import json

import numpy as np
import pytest

from clipscale.cli import main
from clipscale.scaling import FitError, forecast
from clipscale.scaling.forecast import MOMENTUM, schedule_areas
from tests.scaling_rows import write_training_grid, write_training_run


def test_schedule_areas_match_a_float64_reference():
    lr = np.r_[np.linspace(0.25, 1.0, 4), 0.5 * (1 + np.cos(np.pi * np.arange(1, 13) / 12))] * 1e-3
    s1, s2 = schedule_areas(lr=lr, warmup_steps=4)
    rel = lr / lr.max()
    m, ref_s2 = 0.0, []
    for i in range(len(lr)):
        drop = rel[i - 1] - rel[i] if i > 4 else 0.0  # Tissue et al. 2024: momentum of lr decreases after warmup
        m = MOMENTUM * m + drop
        ref_s2.append(m)
    np.testing.assert_allclose(s1, np.cumsum(rel), rtol=1e-12)
    np.testing.assert_allclose(s2, np.cumsum(ref_s2), rtol=1e-12)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    return root, write_training_grid(root)


def truth(run_dir):
    return 1 - [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()][-1]["value"]


def test_leave_one_out_forecasts_from_half_the_run_cover_the_final_error(grid):
    root, runs = grid
    inside, errors = [], []
    for run in runs:
        total = int(run.name.rsplit("-d", 1)[1])
        fc = forecast(run, grid=[str(root / "grid-*")], metric="acc1", until_samples=total / 2, n_bootstrap=50)
        assert fc.samples_seen == total / 2 and fc.total_samples == total
        lo, hi = fc.forecast_pi95
        inside.append(lo <= truth(run) <= hi)
        errors.append(abs(np.log(fc.forecast / truth(run))))
        assert fc.observed[-1][1] > truth(run) * 1.05  # the unannealed error a naive reading would report
    assert sum(inside) >= 7, inside  # 9 runs, 95% intervals
    assert np.median(errors) < 0.02


def test_a_run_off_the_law_is_flagged_and_the_cli_says_so(grid, tmp_path, capsys):
    root, _ = grid
    bad = write_training_run(tmp_path, name="bad", params=4e6, total_samples=12_800, off_law=1.3, seed=7)
    fc = forecast(bad, grid=[str(root / "grid-*")], metric="acc1", until_samples=6_400, n_bootstrap=50)
    assert not fc.on_law and fc.forecast > fc.law_pi95[1] and "worse" in fc.verdict
    good = write_training_run(tmp_path, name="good", params=4e6, total_samples=12_800, seed=8)
    assert forecast(good, grid=[str(root / "grid-*")], metric="acc1", until_samples=6_400, n_bootstrap=50).on_law
    assert main(["forecast", str(bad), "--grid", str(root / "grid-*"), "--watch", "--poll-s", "0",
                 "--plot", str(tmp_path / "fc.png")]) == 0  # finished: one line, then --watch returns
    out = capsys.readouterr().out
    assert out.startswith("FLAG bad 12800/12800 samples (100%)") and "OFF the law" in out
    assert (tmp_path / "fc.png").stat().st_size > 0


def test_a_run_without_curves_is_refused_naming_the_file(grid, tmp_path):
    root, _ = grid
    (tmp_path / "empty").mkdir()
    with pytest.raises(FitError, match=r"empty/config.json not found: forecast reads a run directory"):
        forecast(tmp_path / "empty", grid=[str(root / "grid-*")], metric="acc1")
    early = write_training_run(tmp_path, name="early", params=4e6, total_samples=12_800)
    with pytest.raises(FitError, match="training losses logged after warmup; the forecast needs at least 4"):
        forecast(early, grid=[str(root / "grid-*")], metric="acc1", until_samples=400)
    with pytest.raises(FitError, match=r"no finished run among the grid.s 0 other runs .* \(--fits fits.json\)"):
        forecast(early, grid=[str(early)], metric="acc1", until_samples=6_400)


def test_a_given_law_is_used_and_few_finished_runs_are_noted(grid):
    from clipscale.scaling import fit, laws, load_results

    root, runs = grid
    [law] = fit(load_results([str(r) for r in runs]), metric="acc1", form="nd")
    run = runs[4]
    fc = forecast(run, grid=[str(runs[0]), str(runs[8]), str(run)], metric="acc1", law=law, until_samples=6_400,
                  n_bootstrap=50)
    assert run.name == "grid-n4e+06-d12800"
    assert fc.law == pytest.approx(laws.evaluate(law.law, law.params, np.array([[4e6, 12_800]]))[0, 0])
    assert fc.calibration_runs == 2 and "only 2 finished grid runs to calibrate on" in fc.notes[0]
