"""The long results table: schema, resumable evaluation, no finished row lost, CSV flattening."""
import csv
import io
import json

import pytest
import torch

from clipscale import results
from clipscale.config import EvalConfig, ModelConfig
from clipscale.evaluate.datasets import EvalDataError, open_eval_set
from clipscale.evaluate.runner import evaluate_weights
from clipscale.results import COLUMNS, ModelInfo, ResultsError, append_rows, load_results, make_rows, read_rows, \
    write_csv
from clipscale.scaling.results import one_prompt_set
from clipscale.models import ModelBundle
from tests.eval_kit import DesignedCLIP, json_rows, to_tensor, tokenizer, write_classification_set

INFO = ModelInfo(run="r", model="ViT-B-32", checkpoint="step_000004", step=4, samples_seen=128, params=10,
                 gmacs_per_sample=0.5, dataset="laion")


def test_rows_follow_the_schema():
    rows = make_rows(INFO, task="zeroshot_classification", eval_dataset="s", eval_hash="h",
                     metrics={"acc1": 0.25, "acc5": 1})
    assert [list(r) for r in rows] == [list(COLUMNS)] * 2
    assert rows[0]["evaluated_at"] == rows[1].pop("evaluated_at") and rows[0]["evaluated_at"].endswith("+00:00")
    assert rows[1] == {"run": "r", "model": "ViT-B-32", "checkpoint": "step_000004", "step": 4, "samples_seen": 128,
                       "params": 10, "gmacs_per_sample": 0.5, "compute_gmacs": 64.0, "dataset": "laion",
                       "task": "zeroshot_classification", "eval_dataset": "s", "metric": "acc5", "value": 1.0,
                       "eval_hash": "h"}
    outside = ModelInfo(**{**INFO.__dict__, "checkpoint": None, "step": None, "samples_seen": None})
    assert make_rows(outside, task="linear_probe", eval_dataset="s", eval_hash="h",
                     metrics={"acc1": 0.5})[0]["compute_gmacs"] is None
    with pytest.raises(ValueError, match="task='zeroshot' is not one of"):
        make_rows(INFO, task="zeroshot", eval_dataset="s", eval_hash="h", metrics={})


def test_a_torn_last_line_is_dropped_and_cut_on_append(tmp_path):
    path = tmp_path / "results.jsonl"
    row = make_rows(INFO, task="linear_probe", eval_dataset="s", eval_hash="h", metrics={"acc1": 0.5})
    append_rows(path, row)
    with open(path, "a") as f:
        f.write('{"run": "r", "mod')  # a crash in the middle of a write
    assert read_rows(path) == row
    other = make_rows(INFO, task="linear_probe", eval_dataset="t", eval_hash="h", metrics={"acc1": 0.5})
    assert append_rows(path, row + other) == other  # the row already there is not written twice
    assert json_rows(path) == row + other
    with open(path, "a") as f:
        f.write(json.dumps(row[0] | {"eval_dataset": "u"}))  # a whole row that lost only its newline
    assert append_rows(path, row) == [] and json_rows(path) == row + other + [row[0] | {"eval_dataset": "u"}]
    path.write_text('{"run": 1}\nnot json\n{"run": 2}\n')
    with pytest.raises(ResultsError, match="results.jsonl:2 is not JSON .*fix or delete that line"):
        read_rows(path)


def bundle(model):
    return ModelBundle(model=model, tokenizer=tokenizer(), preprocess_val=to_tensor, image_size=24,
                       mean=(0, 0, 0), std=(1, 1, 1), context_length=16, config=ModelConfig())


def test_rerun_skips_finished_rows_and_a_crash_keeps_them(tmp_path, monkeypatch):
    good = write_classification_set(tmp_path / "good", [[(0, 0), (1, 2)]])
    bad = write_classification_set(tmp_path / "bad", [[(0, 9)]])  # class 9 of 8
    sets = [open_eval_set("good", str(good)), open_eval_set("bad", str(bad))]
    cfg = EvalConfig(tasks=("zeroshot_classification",), num_workers=0)
    out = tmp_path / "results.jsonl"
    with pytest.raises(EvalDataError, match="class 9 is outside"):
        evaluate_weights(bundle(DesignedCLIP()), INFO, sets=sets, cfg=cfg, device=torch.device("cpu"), results=out)
    first = json_rows(out)
    assert [(r["eval_dataset"], r["metric"], r["value"]) for r in first] == [
        ("good", "acc1", 0.5), ("good", "acc5", 1.0), ("good", "mean_per_class_recall", 0.5)]

    write_classification_set(tmp_path / "bad", [[(3, 3)]])
    model = DesignedCLIP()
    new = evaluate_weights(bundle(model), INFO, sets=sets, cfg=cfg, device=torch.device("cpu"), results=out)
    assert {r["eval_dataset"] for r in new} == {"bad"} and len(model.modes_seen) == 1  # "good" was not redone
    assert json_rows(out) == first + new
    assert evaluate_weights(bundle(model), INFO, sets=sets, cfg=cfg, device=torch.device("cpu"), results=out) == []
    (good / "zeroshot_classification_templates.txt").write_text("a {c}.\n")  # new prompts: a new evaluation
    again = evaluate_weights(bundle(model), INFO, sets=[open_eval_set("good", str(good))], cfg=cfg,
                             device=torch.device("cpu"), results=out)
    assert len(again) == 3 and again[0]["eval_hash"] != first[0]["eval_hash"]
    fitted, notes = one_prompt_set(load_results(out).query("eval_dataset == 'good'"))  # what a fit takes
    assert set(fitted["eval_hash"]) == {again[0]["eval_hash"]} and len(fitted) == 3
    assert f"{first[0]['eval_hash']} (3 rows)" in notes[("zeroshot_classification", "good")]


def test_csv_flattens_many_runs(tmp_path):
    for run in ("a", "b"):
        info = ModelInfo(**{**INFO.__dict__, "run": run})
        (tmp_path / run).mkdir()
        append_rows(tmp_path / run / results.RESULTS,
                    make_rows(info, task="zeroshot_classification", eval_dataset="s", eval_hash="h",
                              metrics={"acc1": 0.1, "acc5": 0.2}))
    out = io.StringIO()
    assert write_csv([tmp_path / "a", tmp_path / "b" / "results.jsonl"], out) == 4
    table = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [(r["run"], r["metric"], float(r["value"])) for r in table] == [
        ("a", "acc1", 0.1), ("a", "acc5", 0.2), ("b", "acc1", 0.1), ("b", "acc5", 0.2)]
    assert list(table[0]) == list(COLUMNS) and json.loads(table[0]["step"]) == 4


def test_evaluations_between_checkpoints_are_told_apart_by_their_step(tmp_path):
    """eval.every_samples off the checkpoint grid: rows without a checkpoint, one evaluation per step."""
    good = write_classification_set(tmp_path / "good", [[(0, 0), (1, 2)]])
    cfg = EvalConfig(tasks=("zeroshot_classification",), num_workers=0)
    out = tmp_path / "results.jsonl"
    for step in (3, 5):
        info = ModelInfo(**{**INFO.__dict__, "checkpoint": None, "step": step, "samples_seen": 32 * step})
        rows = evaluate_weights(bundle(DesignedCLIP()), info, sets=[open_eval_set("good", str(good))], cfg=cfg,
                                device=torch.device("cpu"), results=out)
        assert [r["step"] for r in rows] == [step] * 3
    assert [r["step"] for r in read_rows(out)] == [3, 3, 3, 5, 5, 5]
