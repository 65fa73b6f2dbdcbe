import json

import pytest

from tests.helpers import run_cli

pytestmark = pytest.mark.slow


def test_bench_step_writes_json(tmp_path):
    out = tmp_path / "step.json"
    run_cli("bench", "step", "recipes/tiny_cpu.toml", "train.global_batch_size=16", "--steps", "2",
            "--warmup", "1", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["samples_per_s"] > 0 and result["global_batch_size"] == 16
    assert result["mfu"] is None  # no known peak on CPU: MFU is not invented
