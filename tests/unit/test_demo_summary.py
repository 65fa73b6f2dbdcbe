"""The demo's summary reads the long results table: each run's final checkpoint, zero-shot acc1/acc5."""
from clipscale.demo import print_summary
from clipscale.results import ModelInfo, append_rows, make_rows


def test_summary_shows_the_final_checkpoint_of_each_run(tmp_path, capsys):
    for step, acc1 in ((2, 0.1), (4, 0.3)):
        info = ModelInfo(run="tiny-w32", model="clipscale-tiny", checkpoint=f"step_{step:06d}", step=step,
                         samples_seen=step * 32, params=1234, gmacs_per_sample=0.5, dataset="synthetic")
        append_rows(tmp_path / "results.jsonl", make_rows(
            info, task="zeroshot_classification", eval_dataset="synthetic", eval_hash="h",
            metrics={"acc1": acc1, "acc5": acc1 + 0.2, "mean_per_class_recall": acc1}))
    print_summary([tmp_path], fits=[], chance=1 / 30, out=tmp_path, seconds=60)
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split() == ["run", "params", "samples", "compute_gmacs", "acc1", "acc5"]
    assert lines[3].split() == ["tiny-w32", "1234", "128", "64", "0.300", "0.500"]
