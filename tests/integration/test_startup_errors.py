"""A bad config or data layout fails before anything starts: under torchrun the error is printed
once, by rank 0, on one line, the launch exits non-zero, and no run directory is left behind."""
from pathlib import Path

import pytest

from tests.helpers import run_cli

pytestmark = pytest.mark.slow


def start(data: dict, out: Path, *overrides: str, nproc: int = 2):
    return run_cli("train", f'data.train_shards="{data["train"]}"', f'run.output_dir="{out}"', "run.name=bad",
                   "log.progress_bar=false", "train.global_batch_size=32", "train.total_samples=64",
                   *overrides, nproc=nproc, check=False)


@pytest.mark.parametrize("override, message", [
    ("train.log_every_steps=0", "train.log_every_steps=0 is out of range: it must be >= 1"),
    ("data.num_streams=3", "data.num_streams=3 must be a multiple of world size x data.workers = 2 x 1"),
])
def test_a_bad_start_under_torchrun_is_one_line_from_rank_0(synthetic_data, tmp_path, override, message):
    proc = start(synthetic_data, tmp_path, override)
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    errors = [line for line in output.splitlines() if "clipscale: error:" in line]
    assert len(errors) == 1 and message in errors[0], output[-4000:]
    assert "[rank0]:Traceback" not in output and "[rank1]:Traceback" not in output, output[-4000:]
    assert not (tmp_path / "bad").exists()  # no run directory of a start that never began


def test_missing_shards_leave_no_run_directory(tmp_path):
    proc = start({"train": str(tmp_path / "nowhere" / "{000000..000003}.tar")}, tmp_path, nproc=1)
    assert proc.returncode == 2 and "do not exist" in proc.stderr
    assert not (tmp_path / "bad").exists()
