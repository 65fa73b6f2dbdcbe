"""Scaling-law fits: solver and frontier math, recovery, the results table, errors, outputs and CLI."""
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import minimize

from clipscale import scaling
from clipscale.cli import main
from clipscale.scaling import frontier, laws
from clipscale.scaling.fit import fit_points
from tests.scaling_rows import law_rows, write_jsonl

PUBLISHED = Path(__file__).parents[1] / "data" / "cherti2023_zeroshot.csv"  # Cherti et al. 2023's public table


def test_power_fit_equals_closed_form_least_squares():
    rng = np.random.default_rng(1)
    x, y = rng.uniform(1e6, 1e12, 12), rng.uniform(0.1, 0.9, 12)
    slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
    r = fit_points(x[:, None], y, form="power", frontier="none", n_bootstrap=20)
    assert r["params"]["alpha"] == pytest.approx(slope, rel=1e-9)
    assert np.log(r["params"]["A"]) == pytest.approx(intercept, rel=1e-9)


def huber_objective(theta, u, log_y, delta):
    pred, _ = laws.log_model(laws.ND, theta[None], u[None])
    r = np.abs(log_y - pred[0])
    return np.where(r <= delta, 0.5 * r * r, delta * (r - 0.5 * delta)).sum()


def test_nd_solver_reaches_scipy_lbfgs_optimum_of_the_huber_objective():
    rng = np.random.default_rng(3)
    n, d = (g.ravel() for g in np.meshgrid(np.geomspace(1e6, 1e9, 5), np.geomspace(1e7, 1e10, 5)))
    y = (0.1 + 30 / n ** 0.35 + 50 / d ** 0.3) * np.exp(rng.normal(0, 0.02, n.size))
    u = np.log(np.stack([n / n.mean(), d / d.mean()], axis=1))
    log_y = np.log(y)
    lower, upper = laws.bounds(laws.ND, np.full(72, y.min()))
    ours, _ = laws.solve(laws.ND, np.broadcast_to(u, (72, *u.shape)), np.broadcast_to(log_y, (72, len(y))),
                         np.ones((72, len(y))), laws.starts(laws.ND, u, log_y), lower=lower, upper=upper)
    best_ours = min(huber_objective(t, u, log_y, 1e-3) for t in ours)
    lo, hi = laws.bounds(laws.ND, np.array([y.min()]))
    best_scipy = min(minimize(huber_objective, t0, args=(u, log_y, 1e-3), method="L-BFGS-B",
                              bounds=list(zip(lo[0], hi[0]))).fun for t0 in laws.starts(laws.ND, u, log_y)[::6])
    assert best_ours <= best_scipy * (1 + 1e-6)


def test_strict_frontier_matches_brute_force():
    rng = np.random.default_rng(2)
    x, y = rng.integers(1, 20, 40).astype(float), rng.uniform(0, 1, 40)
    front = set(frontier.strict(x, y).tolist())
    brute = {i for i in range(40)
             if all(not (x[j] <= x[i] and y[j] <= y[i] and (x[j], y[j], j) < (x[i], y[i], i)) for j in range(40))}
    assert front == brute


def test_binned_frontier_keeps_each_bins_best_point_at_its_centre():
    # log10 x spans 0..4; bins span 0..4.1 (0.1 decade above the largest x): bins:4 has edges
    # 0, 1.025, 2.05, 3.075, 4.1 and the third bin is empty
    x = np.array([1.0, 3.0, 9.0, 20.0, 50.0, 2000.0, 10_000.0])
    y = np.array([0.9, 0.7, 0.8, 0.6, 0.65, 0.4, 0.3])
    centres, rows = frontier.bins(x, y, 4)
    assert rows.tolist() == [1, 3, 6]
    np.testing.assert_allclose(centres, 10 ** np.array([0.5125, 1.5375, 3.5875]))
    xs, rows = frontier.select(x, y, "bins:2")  # edges 0, 2.05, 4.1
    assert rows.tolist() == [3, 6] and np.allclose(xs, 10 ** np.array([1.025, 3.075]))


@pytest.mark.parametrize("spec", ["bins", "bins:1", "bins:x", "pareto"])
def test_frontier_spec_errors_name_the_choices(spec):
    with pytest.raises(scaling.FitError, match="none, strict, bins:K"):
        frontier.parse(spec)


def test_saturating_fit_recovers_the_floor_and_flags_a_missing_one():
    rng = np.random.default_rng(4)
    x = np.geomspace(1e6, 1e11, 30)
    floor = fit_points(x[:, None], (0.2 + 30 * x ** -0.3) * np.exp(rng.normal(0, 0.01, x.size)),
                       form="saturating", frontier="none", n_bootstrap=200)
    assert floor["params"]["E_inf"] == pytest.approx(0.2, rel=0.1)
    assert floor["ci95"]["E_inf"][0] > 0.1 and not floor["notes"]
    pure = fit_points(x[:, None], 3 * x ** -0.1 * np.exp(rng.normal(0, 0.01, x.size)), form="saturating",
                      frontier="none", n_bootstrap=200)
    assert any("E_inf is not identifiable" in n for n in pure["notes"])


def test_nd_fit_recovers_the_law_and_plans_the_compute_optimal_split(tmp_path):
    df = pd.DataFrame(law_rows(seed=0, params=tuple(np.geomspace(1e6, 1e9, 6)), samples=tuple(np.geomspace(1e7, 1e10, 6)),
                               noise=0.005, checkpoints=1))
    [f] = scaling.fit(df, metric="acc1", form="nd", n_bootstrap=200)
    truth = {"E0": 0.1, "A": 30.0, "a": 0.35, "B": 50.0, "b": 0.3}  # coverage over seeds: test_scaling_stats.py
    for k, v in truth.items():
        assert f.params[k] == pytest.approx(v, rel=0.1), k
    budget = 1e9
    plan = f.plan(budget)
    # brute force: the fitted law along N * D = budget / (GMACs per param per sample)
    n = np.geomspace(1e4, 1e12, 200_001)
    p = f.params
    e = p["E0"] + p["A"] / n ** p["a"] + p["B"] / (budget / f.gmacs_per_param_sample / n) ** p["b"]
    assert plan["params"] == pytest.approx(n[e.argmin()], rel=1e-3)
    assert plan["error"] == pytest.approx(e.min(), rel=1e-9)
    assert plan["params_ci95"][0] < plan["params"] < plan["params_ci95"][1]


def test_csv_and_jsonl_with_the_same_rows_give_the_same_fit(tmp_path):
    published = pd.read_csv(PUBLISHED)
    jsonl = write_jsonl(tmp_path / "published.jsonl", published.to_dict(orient="records"))
    options = dict(metric="acc1", eval_dataset="imagenet1k", by=["dataset"], n_bootstrap=100)
    from_csv, from_jsonl = scaling.fit(scaling.load_results(PUBLISHED), **options), scaling.fit(
        scaling.load_results(jsonl), **options)
    assert [f.group for f in from_csv] == [{"dataset": d} for d in ("CLIP-WIT", "LAION-2B", "LAION-400M",
                                                                    "LAION-80M")]
    for a, b in zip(from_csv, from_jsonl):
        assert a.params == b.params and a.ci95 == b.ci95 and a.params["alpha"] < 0
        assert [p["x"] for p in a.points] == [p["x"] for p in b.points]


def test_published_table_fits_through_the_cli_like_a_run(tmp_path, capsys):
    out = tmp_path / "fits"
    assert main(["fit", str(PUBLISHED), "--metric", "image_retrieval_recall@5", "--eval-dataset", "flickr30k",
                 "--out", str(out), "--bootstrap", "100", "--by", "dataset"]) == 0
    printed = capsys.readouterr().out
    assert "1 - image_retrieval_recall@5 = " in printed and "95% CI" in printed
    fits = json.loads((out / "fits.json").read_text())["fits"]
    assert len(fits) == 4 and {"group", "form", "frontier", "x", "y", "params", "ci95", "n_points", "points",
                               "holdout"} <= set(fits[0])
    assert fits[0]["x"] == "compute_gmacs" and fits[0]["frontier"] == "bins:5"
    assert fits[0]["y"] == "1 - image_retrieval_recall@5"
    # without a compute_gmacs column it is derived as gmacs_per_sample * samples_seen
    derived = tmp_path / "derived.csv"
    pd.read_csv(PUBLISHED).drop(columns="compute_gmacs").to_csv(derived, index=False)
    row = pd.read_csv(derived).iloc[0]
    assert scaling.load_results(derived)["compute_gmacs"].iloc[0] == row["gmacs_per_sample"] * row["samples_seen"]
    for suffix, magic in ((".png", b"\x89PNG"), (".pdf", b"%PDF")):
        assert (out / f"fit_image_retrieval_recall_5{suffix}").read_bytes()[:4] == magic[:4]


def test_predict_reads_fits_back_and_plans(tmp_path, capsys):
    rows = law_rows(seed=1, params=tuple(np.geomspace(1e6, 1e9, 5)), samples=tuple(np.geomspace(1e7, 1e10, 5)))
    write_jsonl(tmp_path / "run" / "results.jsonl", rows)
    fits = scaling.fit_results([tmp_path / "run"], out_dir=tmp_path / "f", metric="acc1", form="nd",
                               n_bootstrap=100)
    back = scaling.read_fits(tmp_path / "f" / "fits.json")
    budgets = np.array([1e8, 1e10])
    np.testing.assert_allclose(back[0].predict(budgets), fits[0].predict(budgets))
    np.testing.assert_allclose(back[0].interval(budgets), fits[0].interval(budgets))
    assert main(["predict", str(tmp_path / "f"), "--budget", "1e8", "--budget", "1e10"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("params" in line and "samples_seen" in line for line in lines)
    plan = back[0].plan(1e10)
    assert plan["error_ci95"][0] <= plan["error"] <= plan["error_ci95"][1]
    assert plan["error_pi95"][1] - plan["error_pi95"][0] >= plan["error_ci95"][1] - plan["error_ci95"][0]


def test_only_final_checkpoints_are_fitted_unless_asked():
    df = pd.DataFrame(law_rows(seed=2, checkpoints=3))
    final = scaling.fit(df, metric="acc1", frontier="none", n_bootstrap=20)[0]
    every = scaling.fit(df, metric="acc1", frontier="none", checkpoints="all", n_bootstrap=20)[0]
    assert {p["checkpoint"] for p in final.points} == {"step_000003"}
    assert final.n_points == 15 and every.n_points == 45
    # a run whose last checkpoint is not yet evaluated on one eval dataset keeps its latest there
    partial = df[~((df["eval_dataset"] == "imagenet1k") & (df["step"] == 3) & (df["run"] == df["run"].iloc[0]))]
    other = df[df["step"] == 3].assign(eval_dataset="cifar10")
    fits = scaling.fit(pd.concat([partial, other]), metric="acc1", frontier="none", by=["eval_dataset"],
                       n_bootstrap=20)
    assert [f.n_points for f in fits] == [15, 15]
    assert {p["checkpoint"] for p in fits[1].points if p["run"] == df["run"].iloc[0]} == {"step_000002"}


def test_holdout_reports_whether_the_extrapolation_held():
    df = pd.DataFrame(law_rows(seed=3, params=tuple(np.geomspace(1e6, 1e9, 6)), samples=(1e8, 1e9, 1e10)))
    [f] = scaling.fit(df, metric="acc1", form="nd", holdout=3, n_bootstrap=100)
    assert f.holdout["k"] == 3 and len(f.holdout["points"]) == 3 and f.holdout["inside_fraction"] == 1.0
    assert all(p["x"] > max(q["x"] for q in f.points) for p in f.holdout["points"])
    # the largest runs fall short of the law by 30%: the check says so
    top = df["compute_gmacs"] >= sorted(p["x"] for p in f.holdout["points"])[0]
    worse = df.assign(value=np.where(top, 1 - (1 - df["value"]) * 1.3, df["value"]))
    [g] = scaling.fit(worse, metric="acc1", form="nd", holdout=3, n_bootstrap=100)
    assert g.holdout["inside_fraction"] == 0.0 and all(p["observed"] > p["pi95"][1] for p in g.holdout["points"])


def test_fit_plot_draws_on_a_given_axis():
    import matplotlib.pyplot as plt

    from clipscale.scaling.plot import draw_fit

    [f] = scaling.fit(pd.read_csv(PUBLISHED), metric="acc1", eval_dataset="imagenet1k",
                      holdout=2, n_bootstrap=50)
    fig, ax = plt.subplots()
    draw_fit(f, ax)
    assert ax.get_xscale() == "log" and len(ax.lines) == 2 and ax.lines[1].get_linestyle() == "--"
    assert ax.get_ylabel() == "1 - acc1" and ax.get_xlabel() == "compute_gmacs"
    plt.close(fig)


def write_rows(tmp_path, rows):
    return write_jsonl(tmp_path / "r" / "results.jsonl", rows)


def good_rows(n=6):
    return [{"run": f"r{i}", "model": "m", "step": 1, "samples_seen": 10 ** (i + 3), "params": 10 ** 6,
             "gmacs_per_sample": 1.0, "dataset": "d", "task": "zeroshot_classification", "eval_dataset": "e",
             "metric": "acc1", "value": 1 - 0.9 * 10 ** (-0.1 * i)} for i in range(n)]


@pytest.mark.parametrize(("edit", "options", "message"), [
    (lambda r: r[:2], {}, "keeps 2 points; the power form needs at least 3"),
    (lambda r: r[:3], {"form": "saturating", "frontier": "none"}, "the saturating form needs at least 4"),
    (lambda r: [{**x, "value": 1.0} if i == 2 else x for i, x in enumerate(r)], {}, r"acc1=1.0 gives error 0"),
    (lambda r: [{**x, "value": 73.0} for x in r], {}, "values in percent"),
    (lambda r: [{**x, "value": None} if i == 1 else x for i, x in enumerate(r)], {}, r"results.jsonl:2: value="),
    (lambda r: [{**x, "value": "n/a"} if i == 1 else x for i, x in enumerate(r)], {}, r"value='n/a' \(1 such"),
    (lambda r: [{**x, "samples_seen": 1000} for x in r], {}, "share the same inputs"),
    (lambda r: [{**x, "gmacs_per_sample": -1.0} for x in r], {}, "positive compute_gmacs"),
    (lambda r: r, {"metric": "acc3"}, r"metric 'acc3' is not in the results \(metrics: \['acc1'\]\)"),
    (lambda r: [{**x, "metric": "bleu"} for x in r], {"metric": "bleu"},
     r"'bleu' is neither an accuracy or recall .* nor named as an error .*--error value .*--error 1-value"),
    (lambda r: r, {"error": "log"}, r"error='log' must be one of \['value', '1-value'\]"),
    (lambda r: [{**x, "metric": "loss", "value": 0.0 if i == 3 else 2.0 + i} for i, x in enumerate(r)],
     {"metric": "loss"}, r"results.jsonl:4: loss=0.0 \(1 such rows\); an error fitted as it is must be positive"),
    (lambda r: r, {"form": "nd", "huber_delta": 0.0}, "huber_delta=0.0 must be a positive threshold"),
    (lambda r: r + [{**x, "eval_dataset": "f"} for x in r], {}, "span several eval_datasets .*--eval-dataset"),
    (lambda r: r, {"eval_dataset": "cifar10"}, "no acc1 rows with eval_dataset='cifar10'"),
    (lambda r: r, {"form": "cubic"}, "form 'cubic' is not one of"),
    (lambda r: r, {"form": "nd", "frontier": "bins:5"}, "use frontier 'none'"),
    (lambda r: r, {"holdout": 5}, "--holdout 5 leaves too few"),
    (lambda r: r, {"by": ["family"]}, "the results have no column 'family'"),
    (lambda r: r, {"checkpoints": "last"}, "checkpoints='last' must be 'final' or 'all'"),
    (lambda r: r, {"form": "nd", "x": "params"}, "drop --x params"),
    (lambda r: r + [{**x, "dataset": "d2"} for x in r[:2]], {"by": ["dataset"]},
     r"group \{'dataset': 'd2'\}: frontier bins:5 keeps 2 points"),
    (lambda r: [{k: v for k, v in x.items() if k != "dataset"} for x in r], {}, r"lacks the columns \['dataset'\]"),
])
def test_bad_inputs_give_clear_errors_and_write_nothing(tmp_path, edit, options, message):
    path = write_rows(tmp_path, edit(good_rows()))
    with pytest.raises(scaling.FitError, match=message):
        scaling.fit_results([path.parent], out_dir=tmp_path / "out", **{"metric": "acc1", **options})
    assert not (tmp_path / "out").exists()


def test_fits_files_and_interval_kinds_are_checked(tmp_path):
    with pytest.raises(scaling.FitError, match="no fits at .*fits.json: run `clipscale fit"):
        scaling.read_fits(tmp_path)
    (tmp_path / "fits.json").write_text('{"metric": "acc1"}')
    with pytest.raises(scaling.FitError, match="is not a clipscale fits.json"):
        scaling.read_fits(tmp_path / "fits.json")
    [f] = scaling.fit(pd.DataFrame(good_rows()), metric="acc1", n_bootstrap=20)
    with pytest.raises(scaling.FitError, match="interval kind 'credible' must be 'confidence' or 'prediction'"):
        f.interval([1e6], kind="credible")


def test_rows_built_by_hand_are_named_by_index():
    df = pd.DataFrame(good_rows()).assign(value=[0.1, 0.2, float("nan"), 0.4, 0.5, 0.6])
    with pytest.raises(scaling.FitError, match="row 2: value=nan"):
        scaling.fit(df, metric="acc1")


def test_missing_and_malformed_files_are_named(tmp_path):
    with pytest.raises(scaling.FitError, match="no results at .*missing"):
        scaling.load_results([tmp_path / "missing"])
    with pytest.raises(scaling.FitError, match="no results match .*nothing-"):
        scaling.load_results(str(tmp_path / "nothing-*"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(good_rows()[0]) + "\n{oops\n")
    with pytest.raises(scaling.FitError, match="bad.jsonl:2 is not JSON"):
        scaling.load_results(bad)
    assert main(["fit", str(tmp_path / "missing"), "--metric", "acc1", "--out", str(tmp_path / "o")]) == 2


def test_bootstrap_replicates_reselect_the_frontier_among_the_drawn_rows():
    from clipscale.scaling.fit import _resampled

    rng = np.random.default_rng(5)
    x, y = rng.uniform(1, 1e4, (30, 1)), rng.uniform(0.1, 1, 30)
    counts = rng.integers(0, 3, (20, 30)).astype(float)
    bx, by, bw = _resampled(x, y, counts, "strict")
    for c, rx, ry, rw in zip(counts, bx, by, bw):
        drawn = np.flatnonzero(c)
        front = drawn[frontier.strict(x[drawn, 0], y[drawn])]
        assert rw.sum() == len(front) and np.array_equal(rx[rw > 0, 0], x[front, 0]) and np.array_equal(
            ry[rw > 0], y[front])
    _, _, bw = _resampled(x, y, counts, "none")
    assert np.array_equal(bw, counts)


def test_bootstrap_resamples_whole_runs():
    # each run appears as two identical rows: resampling runs doubles every weight and changes nothing,
    # resampling rows would split the pairs
    rng = np.random.default_rng(6)
    x = np.geomspace(1e6, 1e10, 12)[:, None]
    y = 3 * x[:, 0] ** -0.2 * np.exp(rng.normal(0, 0.03, 12))
    single = fit_points(x, y, form="power", frontier="none", n_bootstrap=100)
    paired = fit_points(np.repeat(x, 2, axis=0), np.repeat(y, 2), form="power", frontier="none",
                        units=np.repeat(np.arange(12), 2), n_bootstrap=100)
    for k in ("A", "alpha"):
        assert paired["ci95"][k] == pytest.approx(single["ci95"][k], rel=1e-9)


def test_too_few_runs_to_bootstrap_is_an_error_not_a_silent_interval():
    # 6 runs are enough points for the 5 parameters of nd, but 3 in 4 replicates draw fewer than 5 distinct runs
    n, d = np.array([1e6, 1e7, 1e8, 1e6, 1e7, 1e8]), np.array([1e8, 1e8, 1e8, 1e9, 1e9, 1e9])
    y = 0.1 + 30 / n ** 0.35 + 50 / d ** 0.3
    with pytest.raises(scaling.FitError, match="of 100 bootstrap replicates keep 5 distinct points: too few runs"):
        fit_points(np.stack([n, d], axis=1), y, form="nd", frontier="none", n_bootstrap=100)


def test_plan_survives_replicates_with_extreme_exponents():
    boot = {"E0": [0.0, 0.1], "A": [1e30, 30.0], "a": [1e-6, 0.35], "B": [1.3, 50.0], "b": [0.04, 0.3]}
    f = scaling.Fit(group={}, form="nd", frontier="none", x="compute_gmacs", y="1 - acc1",
                    params={k: v[1] for k, v in boot.items()}, ci95={}, n_points=0, points=[], all_points=[],
                    bootstrap=boot, log_residuals=[0.0], gmacs_per_param_sample=1e-9)
    with np.errstate(divide="raise", invalid="raise"):
        plan = f.plan(1e12)
    assert np.isfinite([plan["error"], *plan["error_ci95"], plan["params"]]).all()


def flat_rows(slope: float, noise: float, *, coefficient: float = 0.3, seed: int = 7) -> pd.DataFrame:
    """acc1 rows of 12 runs with error = coefficient * compute_gmacs^slope (1e6..1e12) and log-normal noise."""
    rng = np.random.default_rng(seed)
    c = np.geomspace(1e6, 1e12, 12)
    error = coefficient * c ** slope * np.exp(rng.normal(0, noise, c.size))
    return pd.DataFrame({"run": [f"r{i}" for i in range(12)], "model": "m", "compute_gmacs": c, "dataset": "d",
                         "task": "zeroshot_classification", "eval_dataset": "e", "metric": "acc1", "value": 1 - error})


def test_a_law_whose_error_does_not_fall_with_compute_says_so(caplog):
    [rising] = scaling.fit(flat_rows(0.02, 0.01), metric="acc1", frontier="none", n_bootstrap=100)
    assert rising.params["alpha"] > 0 and any("alpha = +0.02" in n and "does not fall" in n for n in rising.notes)
    [flat] = scaling.fit(flat_rows(-0.003, 0.05), metric="acc1", frontier="none", n_bootstrap=100)
    lo, hi = flat.ci95["alpha"]
    assert flat.params["alpha"] < 0 < hi and any("interval" in n and "reaches 0" in n for n in flat.notes)
    assert "reaches 0" in scaling.format_fits([flat]) and "reaches 0" in caplog.text
    [falling] = scaling.fit(flat_rows(-0.1, 0.01), metric="acc1", frontier="none", n_bootstrap=100)
    assert not any("alpha" in n for n in falling.notes)


def test_predictions_of_one_minus_a_score_stay_in_its_range_and_losses_are_not_clipped():
    rows = flat_rows(-0.3, 0.05, coefficient=30.0)  # error 0.47 at 1e6 .. 0.007 at 1e12
    [f] = scaling.fit(rows, metric="acc1", frontier="none", n_bootstrap=100)
    tiny = np.array([1.0, 1e3])  # far below the data: the law itself exceeds an error of 1
    assert (f._curves(tiny)[0] > 1).all()
    assert (f.predict(tiny) == 1.0).all() and f.y_max == 1.0
    for kind in ("confidence", "prediction"):
        lo, hi = f.interval(tiny, kind=kind)
        assert (hi <= 1.0).all() and (lo <= hi).all()
    plan = f.plan(1.0)
    assert plan["error"] <= 1 and plan["error_ci95"][1] <= 1 and plan["error_pi95"][1] <= 1
    [loss] = scaling.fit(rows.assign(metric="loss", value=1 - rows["value"]), metric="loss", frontier="none",
                         n_bootstrap=100)
    assert loss.y == "loss" and loss.y_max is None and (loss.predict(tiny) > 1).all()


def test_an_explicit_error_choice_fits_any_metric(tmp_path, capsys):
    rows = flat_rows(-0.1, 0.01)
    path = tmp_path / "bits.csv"
    rows.assign(metric="bits_per_byte", value=1 - rows["value"]).to_csv(path, index=False)
    assert main(["fit", str(path), "--metric", "bits_per_byte", "--out", str(tmp_path / "o"),
                 "--frontier", "none", "--bootstrap", "50"]) == 2
    assert "--error value" in capsys.readouterr().err
    assert main(["fit", str(path), "--metric", "bits_per_byte", "--error", "value", "--out", str(tmp_path / "o"),
                 "--frontier", "none", "--bootstrap", "50"]) == 0
    assert re.search(r"^bits_per_byte = 0\.\d+ \* compute_gmacs\^\(-0\.\d+\)", capsys.readouterr().out, re.M)
    [f] = scaling.read_fits(tmp_path / "o")
    assert f.y == "bits_per_byte" and f.y_max is None
    [g] = scaling.fit(rows.assign(metric="win_rate"), metric="win_rate", error="1-value", frontier="none",
                      n_bootstrap=20)
    assert g.y == "1 - win_rate" and g.params["alpha"] == pytest.approx(-0.1, abs=0.01)


def test_the_scaling_package_has_no_import_cycle():
    import ast

    package = Path(scaling.__file__).parent
    graph = {}
    for file in package.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(file.read_text())):  # function-level and TYPE_CHECKING imports included
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                imported |= {n.rsplit(".", 1)[-1] for n in names if n.startswith("clipscale.scaling.")}
        graph[file.stem] = imported - {file.stem}

    def reaches(start, goal, seen=()):
        return any(n == goal or (n not in seen and reaches(n, goal, (*seen, n))) for n in graph.get(start, ()))

    assert [m for m in graph if m != "__init__" and reaches(m, m)] == []


@pytest.mark.parametrize(("metric", "kind"), [
    ("acc1", "1-value"), ("acc5", "1-value"), ("mean_per_class_recall", "1-value"),
    ("mean_average_precision", "1-value"), ("image_retrieval_recall@5", "1-value"), ("text_retrieval_recall@10", "1-value"), ("loss", "value"),
    ("contrastive_loss", "value"), ("val-loss", "value"), ("error", "value"), ("top1_error", "value"),
    ("err1", "value"), ("perplexity", "value"),
])
def test_metric_names_say_what_is_fitted(metric, kind):
    from clipscale.scaling.results import error_kind, error_name

    assert error_kind(metric) == kind
    assert error_name(metric) == (f"1 - {metric}" if kind == "1-value" else metric)
    assert error_name(metric, "value") == metric and error_name(metric, "1-value") == f"1 - {metric}"
