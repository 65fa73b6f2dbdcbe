"""The real CLI end to end: torchrun training, world-size invariance, eval, fit, errors."""
import json
from pathlib import Path

import pytest

from tests.eval_kit import json_rows
from tests.helpers import REPO, run_cli

pytestmark = pytest.mark.slow


def common(data: dict, out: Path, name: str) -> list[str]:
    return [
        f'data.train_shards="{data["train"]}"', f'eval.datasets=["synthetic={data["zeroshot"]}"]',
        f'run.output_dir="{out}"', f"run.name={name}", "log.progress_bar=false",
        "train.global_batch_size=32", "train.total_samples=192", "train.log_every_steps=1",
        "train.checkpoint_every_samples=64", "optim.warmup_samples=64", "data.workers=1",
    ]


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def two_rank_run(synthetic_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    run_cli("train", *common(synthetic_data, out, "ddp2"), nproc=2)
    return out / "ddp2"


def test_two_ranks_follow_the_one_process_trajectory(two_rank_run, synthetic_data, tmp_path):
    run_cli("train", *common(synthetic_data, tmp_path, "single"), nproc=1)
    ddp, single = losses(two_rank_run), losses(tmp_path / "single")
    assert len(ddp) == len(single) == 6
    assert ddp == pytest.approx(single, rel=1e-4, abs=1e-5)
    assert single[0] != pytest.approx(single[-1], rel=1e-3)  # it is actually training


def test_run_directory_layout(two_rank_run):
    cfg = json.loads((two_rank_run / "config.json").read_text())
    assert cfg["train"]["global_batch_size"] == 32
    names = sorted(p.name for p in (two_rank_run / "checkpoints").iterdir())
    assert names == ["step_000002", "step_000004", "step_000006"]  # the scan of complete ones is the record


def test_eval_then_fit(two_rank_run, synthetic_data, tmp_path):
    proc = run_cli("eval", str(two_rank_run))
    assert "step_000006 zeroshot_classification synthetic acc1=" in proc.stdout
    records = [json.loads(line) for line in (two_rank_run / "results.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 2, 2, 4, 4, 4, 6, 6, 6]  # acc1, acc5, mean_per_class_recall
    for r in records:
        assert r["compute_gmacs"] == pytest.approx(r["gmacs_per_sample"] * r["samples_seen"])
        assert 0.0 <= r["value"] <= 1.0
    run_cli("eval", str(two_rank_run))  # idempotent: nothing re-evaluated
    assert len((two_rank_run / "results.jsonl").read_text().splitlines()) == 9

    # A run long enough to learn gives the fit a frontier of several points.
    learner = [*common(synthetic_data, tmp_path, "learner"), "train.global_batch_size=64",
               "train.total_samples=2048", "train.checkpoint_every_samples=512", "optim.lr_peak=3e-3",
               "model.vision_width=32", "model.text_width=32", "model.embed_dim=32"]
    run_cli("train", *learner)
    run_cli("eval", str(tmp_path / "learner"))
    final = [r for r in json_rows(tmp_path / "learner" / "results.jsonl") if r["step"] == 32 and r["metric"] == "acc1"]
    assert final[0]["value"] > 2 / 30  # twice chance on the held-out set of 30 classes
    run_cli("fit", str(two_rank_run), str(tmp_path / "learner"), "--metric", "acc1", "--task",
            "zeroshot_classification", "--checkpoints", "all", "--frontier", "none", "--out", str(tmp_path / "fit"))
    [fit] = json.loads((tmp_path / "fit" / "fits.json").read_text())["fits"]
    assert fit["y"] == "1 - acc1" and fit["x"] == "compute_gmacs" and fit["n_points"] == 7
    assert fit["params"]["alpha"] < 0
    assert (tmp_path / "fit" / "fit_acc1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    bad = run_cli("fit", str(tmp_path / "nothing"), "--metric", "acc1", "--out", str(tmp_path / "fit2"), check=False)
    assert bad.returncode == 2 and "no results at" in bad.stderr


def test_broken_recipes_fail_naming_the_problem(tmp_path, synthetic_data):
    bad = run_cli("train", "train.global_batchsize=3", check=False)
    assert bad.returncode == 2 and "did you mean 'global_batch_size'" in bad.stderr
    recipe = tmp_path / "r.toml"
    recipe.write_text("[train]\nglobal_batch_size = 'big'\n")
    bad = run_cli("train", str(recipe), check=False)
    assert bad.returncode == 2 and "train.global_batch_size" in bad.stderr
    bad = run_cli("train", str(REPO / "recipes" / "scaling_tiny.toml"), check=False)  # trains nothing
    assert bad.returncode == 2 and "clipscale sweep" in bad.stderr and "scaling_tiny.toml" in bad.stderr
    missing = tmp_path / "nowhere" / "{000000..000003}.tar"
    bad = run_cli("train", f'data.train_shards="{missing}"', f'run.output_dir="{tmp_path}"', check=False)
    assert bad.returncode == 2 and "do not exist" in bad.stderr and "nowhere" in bad.stderr
    bad = run_cli("train", f'data.train_shards="{tmp_path}/nowhere/*.tar"', f'run.output_dir="{tmp_path}"',
                  check=False)
    assert bad.returncode == 2 and f"{tmp_path}/nowhere/*.tar matches no file" in bad.stderr


def test_train_reads_a_glob_of_shards(synthetic_data, tmp_path):
    glob = synthetic_data["train"].split("{")[0] + "*.tar"  # the same shards, as people write them
    run_cli("train", *common(synthetic_data, tmp_path, "glob"), f'data.train_shards="{glob}"',
            "train.total_samples=64")
    assert len(losses(tmp_path / "glob")) == 2


def test_gradient_cache_follows_the_plain_trajectory(two_rank_run, synthetic_data, tmp_path):
    """train.chunk_size=5 (ragged: 16 per rank) on 2 ranks reproduces the plain DDP losses."""
    run_cli("train", *common(synthetic_data, tmp_path, "gc"), "train.chunk_size=5", nproc=2)
    assert losses(tmp_path / "gc") == pytest.approx(losses(two_rank_run), rel=1e-4, abs=1e-5)
