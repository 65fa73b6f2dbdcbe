"""`clipscale sweep RECIPE --local`: a [sweep] grid trained with torchrun on this machine, then evaluated."""
import pytest

from tests.eval_kit import json_rows
from tests.helpers import run_cli

pytestmark = pytest.mark.slow

GRID = """
[run]
name = "grid"

[data]
workers = 1

[optim]
warmup_samples = 32

[train]
global_batch_size = 32
checkpoint_every_samples = 64

[sweep]
samples = [{ name = "s64", "train.total_samples" = 64 }, { name = "s96", "train.total_samples" = 96 }]
"""


def test_local_sweep_trains_evaluates_and_skips_finished_points(synthetic_data, tmp_path):
    recipe = tmp_path / "grid.toml"
    recipe.write_text(GRID)
    overrides = [f'data.train_shards="{synthetic_data["train"]}"',
                 f'eval.datasets=["synthetic={synthetic_data["zeroshot"]}"]', f'run.output_dir="{tmp_path / "runs"}"']
    first = run_cli("sweep", str(recipe), "--local", "--parallel", "2", *overrides, cwd=tmp_path).stdout
    runs = [tmp_path / "runs" / name for name in ("grid-s64", "grid-s96")]
    for run, steps in zip(runs, (2, 3)):
        assert f"point {runs.index(run)}: training {run.name}" in first
        assert (run / "checkpoints" / f"step_{steps:06d}").is_dir()
        rows = json_rows(run / "results.jsonl")
        assert {r["checkpoint"] for r in rows} == {p.name for p in (run / "checkpoints").iterdir()}
        assert str(run) in first and (run / "logs" / "torchrun.log").is_file()
    assert "[sweep] results:" in first

    again = run_cli("sweep", str(recipe), "--local", *overrides, cwd=tmp_path).stdout  # resumable: nothing to do
    assert again.count("(finished, skipped)") == 2 and "training" not in again
    assert again.count(": 0 new result rows") == 2
