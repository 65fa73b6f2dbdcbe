"""What a resume promises, through the real CLI: a tampered checkpoint runs nothing, a changed
config is refused unless asked for, and a run ends on `train.total_samples`."""
import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest

from tests.helpers import run_cli

pytestmark = pytest.mark.slow


def args(data: dict, out: Path, name: str, *extra: str) -> list[str]:
    return ["train", f'data.train_shards="{data["train"]}"', f'eval.datasets=["synthetic={data["zeroshot"]}"]',
            f'run.output_dir="{out}"', f"run.name={name}", "log.progress_bar=false", "train.global_batch_size=32",
            "train.total_samples=192", "train.log_every_steps=1", "train.checkpoint_every_samples=64",
            "optim.warmup_samples=64", "data.workers=1", *extra]


@pytest.fixture(scope="module")
def finished(synthetic_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished")
    run_cli(*args(synthetic_data, out, "base"))
    return out / "base"


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to / run.name)
    return to / run.name


def snapshot(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


def config(path: Path) -> dict:
    return json.loads(path.read_text())


def last_meta(run: Path) -> dict:
    return config(sorted((run / "checkpoints").glob("step_*"))[-1] / "meta.json")


class CreatesAFile:
    """Unpickling this object calls open(path, "w"): what a hostile file on a shared disk could do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_tampered_checkpoint_runs_nothing_on_resume_eval_or_export(finished, synthetic_data, tmp_path):
    run = copy_run(finished, tmp_path)
    marker = tmp_path / "code_ran"
    latest = run / "checkpoints" / "step_000006"
    (latest / ".metadata").write_bytes(pickle.dumps(CreatesAFile(marker)))  # DCP's pickled index
    commands = {"resume": args(synthetic_data, tmp_path, "base"),
                "eval": ["eval", str(latest), "--device", "cpu"],
                "export": ["export", str(latest), "--out", str(tmp_path / "exported")]}
    for name, argv in commands.items():
        proc = run_cli(*argv, check=False)
        assert proc.returncode == 2, (name, proc.stderr[-3000:])
        assert "step_000006/.metadata: a clipscale checkpoint holds only meta.json and shard-*.safetensors" \
            in proc.stderr, name
        assert not marker.exists(), name


def test_a_changed_config_is_refused_unless_asked_for_and_every_config_is_kept(finished, synthetic_data, tmp_path):
    run = copy_run(finished, tmp_path)
    before = snapshot(run)
    refused = run_cli(*args(synthetic_data, tmp_path, "base", "optim.lr_peak=5e-3"), check=False)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "optim.lr_peak: 0.001 -> 0.005" in refused.stderr and "--allow-config-change" in refused.stderr
    assert snapshot(run) == before  # nothing written, nothing lost

    run_cli(*args(synthetic_data, tmp_path, "base", "optim.lr_peak=5e-3"), "--allow-config-change")
    assert config(run / "config.json")["optim"]["lr_peak"] == 5e-3
    assert config(run / "config.0.json")["optim"]["lr_peak"] == 1e-3


def test_a_longer_run_is_an_allowed_extension(finished, synthetic_data, tmp_path):
    run = copy_run(finished, tmp_path)
    extended = run_cli(*args(synthetic_data, tmp_path, "base", "train.total_samples=256"))
    assert "resumed from" in extended.stderr and "train.total_samples changed: 192 -> 256" in extended.stderr
    assert last_meta(run)["samples_seen"] == 256
    assert config(run / "config.0.json")["train"]["total_samples"] == 192


def test_a_resume_with_another_batch_ends_on_total_samples(finished, synthetic_data, tmp_path):
    """192 samples seen at batch 32; to 384 at batch 48 is 4 more steps, not 384 // 48 - 6 = 2."""
    run = copy_run(finished, tmp_path)
    run_cli(*args(synthetic_data, tmp_path, "base", "train.total_samples=384", "train.global_batch_size=48"),
            "--allow-config-change")
    meta = last_meta(run)
    assert (meta["step"], meta["samples_seen"]) == (10, 384)
