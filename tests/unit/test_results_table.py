"""The results table under concurrent writers and torn tails, and fits that use one prompt set."""
import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from clipscale import scaling
from clipscale.cli import main
from clipscale.config import EvalConfig
from clipscale.evaluate.datasets import open_eval_set
from clipscale.evaluate.runner import evaluate_weights
from clipscale.results import IDENTITY, ModelInfo, load_results, read_rows, row_key
from tests.eval_kit import DesignedCLIP, write_classification_set
from tests.helpers import REPO
from tests.scaling_rows import law_rows, write_jsonl
from tests.unit.test_eval_results import bundle

# Each writer appends BATCHES batches: 10 rows of its own run and the same 10 rows of a run both write
# (two evaluators of one checkpoint). Rows are ~600 bytes, so a reader often meets a write in progress.
BATCHES = 120
WRITER = """
import sys
from clipscale.results import append_rows
path, writer = sys.argv[1], sys.argv[2]
for i in range({batches}):
    append_rows(path, [{{"run": run, "model": "m", "checkpoint": f"step_{{i:06d}}", "step": i + 1,
                        "samples_seen": 1000 * (i + 1), "params": 10 ** 6, "gmacs_per_sample": 1.0, "dataset": "d",
                        "task": "zeroshot_classification", "eval_dataset": f"e{{k}}", "metric": "acc1",
                        "value": 1 - 0.9 * (1000 * (i + 1)) ** -0.1, "eval_hash": "h", "padding": "x" * 400}}
                       for run in (f"w{{writer}}", "shared") for k in range(10)])
""".format(batches=BATCHES)


def test_two_writers_and_a_reader_that_fits_lose_and_duplicate_nothing(tmp_path):
    path = tmp_path / "run" / "results.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(w)], cwd=REPO, env=env,
                                stderr=subprocess.PIPE, text=True) for w in (0, 1)]
    reads, fits, last = 0, 0, 0
    while any(w.poll() is None for w in writers):
        if not path.exists():
            continue
        rows = read_rows(path)
        keys = [row_key(r) for r in rows]
        assert len(keys) == len(set(keys)), "a row is in the table twice"
        assert len(rows) >= last, "rows vanished"
        last, reads = len(rows), reads + 1
        table = load_results(path.parent)  # the fit's reader, mid-write as often as not
        if table["step"].nunique() >= 3:
            [f] = scaling.fit(table, metric="acc1", eval_dataset="e0", checkpoints="all", frontier="none",
                              n_bootstrap=10)
            fits += 1
    for w in writers:
        assert w.wait() == 0, w.stderr.read()[-3000:]
    rows = read_rows(path)
    expected = {(run, i + 1, f"e{k}") for run in ("w0", "w1", "shared") for i in range(BATCHES) for k in range(10)}
    assert sorted((r["run"], r["step"], r["eval_dataset"]) for r in rows) == sorted(expected)
    [f] = scaling.fit(load_results(path), metric="acc1", eval_dataset="e0", checkpoints="all", frontier="none",
                      n_bootstrap=10)
    assert reads > 1 and fits >= 1 and f.n_points == 3 * BATCHES


def test_fit_and_the_evaluator_tolerate_a_torn_last_line(tmp_path, capsys):
    path = write_jsonl(tmp_path / "run" / "results.jsonl", law_rows(checkpoints=1))
    with open(path, "a") as f:
        f.write('{"run": "x", "model": "toy-1e+06", "checkp')  # a writer killed mid-write
    assert main(["fit", str(path.parent), "--metric", "acc1", "--bootstrap", "20", "--out", str(tmp_path / "fit")]) == 0
    assert "1 - acc1 = " in capsys.readouterr().out

    classes = write_classification_set(tmp_path / "set", [[(0, 0), (1, 1)]])
    info = ModelInfo(run="x", model="m", checkpoint=None, step=None, samples_seen=None, params=1,
                     gmacs_per_sample=1.0, dataset="d")
    cfg = EvalConfig(tasks=("zeroshot_classification",), num_workers=0)
    new = evaluate_weights(bundle(DesignedCLIP()), info, sets=[open_eval_set("s", str(classes))], cfg=cfg,
                           device=torch.device("cpu"), results=path)
    lines = path.read_text().splitlines()
    assert len(new) == 3 and [json.loads(line) for line in lines[-3:]] == new  # the torn line is gone
    assert len(lines) == len(law_rows(checkpoints=1)) + 3


def two_prompt_sets() -> pd.DataFrame:
    """The same runs evaluated twice: first with prompts that flatter them (eval_hash old...), then anew."""
    old = [{**r, "value": 1 - (1 - r["value"]) * 0.7, "eval_hash": "old0aaaa", "evaluated_at": "2026-01-05T10:00:00"}
           for r in law_rows(checkpoints=1)]
    new = [{**r, "eval_hash": "new1bbbb", "evaluated_at": "2026-02-07T09:00:00"} for r in law_rows(checkpoints=1)]
    return pd.DataFrame(new[:5] + old + new[5:])  # file order alone does not decide


def test_a_fit_uses_the_newest_prompt_set_and_names_the_others(tmp_path, capsys):
    table = two_prompt_sets()
    options = dict(metric="acc1", n_bootstrap=50)
    [f] = scaling.fit(table, **options)
    [only_new] = scaling.fit(table[table["eval_hash"] == "new1bbbb"], **options)
    assert f.params == only_new.params and f.n_points == only_new.n_points
    assert any("newest prompt set eval_hash=new1bbbb" in n and "old0aaaa (15 rows)" in n for n in f.notes)
    [old] = scaling.fit(table, eval_hash="old0", **options)  # a prefix is enough
    assert old.params == scaling.fit(table[table["eval_hash"] == "old0aaaa"], **options)[0].params
    assert old.params["A"] != f.params["A"]
    with pytest.raises(scaling.FitError, match=r"--eval-hash xyz matches no prompt sets .*'new1bbbb', 'old0aaaa'"):
        scaling.fit(table, eval_hash="xyz", **options)
    with pytest.raises(scaling.FitError, match="matches 2 prompt sets"):
        scaling.fit(table, eval_hash="", **options)

    path = write_jsonl(tmp_path / "r" / "results.jsonl", table.to_dict(orient="records"))
    assert main(["fit", str(path), "--metric", "acc1", "--bootstrap", "20", "--out", str(tmp_path / "o"),
                 "--eval-hash", "old0aaaa"]) == 0
    fitted = json.loads((tmp_path / "o" / "fits.json").read_text())["fits"][0]
    lines = path.read_text().splitlines()
    assert {json.loads(lines[int(p["source"].rsplit(":", 1)[1]) - 1])["eval_hash"] for p in fitted["points"]} == {
        "old0aaaa"}
    capsys.readouterr()
    assert main(["fit", str(path), "--metric", "acc1", "--bootstrap", "20", "--out", str(tmp_path / "o")]) == 0
    assert "note: zeroshot_classification imagenet1k: fitted the newest prompt set" in capsys.readouterr().out


def test_row_identity_includes_the_prompt_set_and_the_step():
    row = law_rows()[0]
    assert {"eval_hash", "step", "checkpoint", "metric"} <= set(IDENTITY)
    assert row_key(row) != row_key({**row, "eval_hash": "other"}) != row_key({**row, "step": 2})
