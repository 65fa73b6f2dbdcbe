"""Loader benchmarks at toy size: `clipscale bench loader` (the user's entry point) and
`python -m benchmarks.loader` (the comparison): JSON structure, finite positive figures, ratios
consistent with the rates, statistics checked against the shards themselves. No timing assertions."""
import io
import json
import math
import statistics
import tarfile

import numpy as np
import pytest
from PIL import Image

from benchmarks import loader as comparison
from benchmarks.shards import realistic_format, realistic_shape, write_shards
from clipscale import cli
from clipscale.bench import loader
from tests.shard_kit import write_dataset

TINY = ["--workers", "1", "--batch", "8", "--samples", "16", "--repeats", "1"]


def check_rate(r: dict, *, samples: int) -> None:
    for key in ("samples", "seconds", "samples_per_s", "samples_per_s_per_core"):
        assert math.isfinite(r[key]) and r[key] > 0, (key, r)
    assert r["samples"] >= samples
    assert r["samples_per_s"] == pytest.approx(r["samples"] / r["seconds"])
    assert 0 <= r["other_processes_cpu_fraction"] < 2  # a share of the CPUs (sampling slack)


@pytest.mark.slow
def test_clipscale_bench_loader_on_given_shards(tmp_path, capsys):
    spec = write_dataset(tmp_path / "shards", [12, 10], with_sizes=False)  # resampled by default: no sizes needed
    out = tmp_path / "loader.json"
    assert cli.main(["bench", "loader", "--shards", spec, *TINY, "--workers", "2", "data.shuffle_buffer=7",
                     "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "loader" and len(result["rounds"]) == 1
    check_rate(result["rounds"][0], samples=16)
    assert result["rounds"][0]["samples_per_s_per_core"] == pytest.approx(result["rounds"][0]["samples_per_s"] / 2)
    data = result["data"]
    assert data["train_shards"] == spec and data["resampled"] and data["shuffle_buffer"] == 7
    assert data["workers"] == data["num_streams"] == 2
    assert "per worker core" in capsys.readouterr().out


def test_clipscale_bench_loader_errors_name_the_fix(tmp_path, capsys):
    spec = write_dataset(tmp_path / "shards", [4])
    assert cli.main(["bench", "loader", "--shards", spec, "data.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        loader.main(["--shards", spec, "train.global_batch_size=8"])
    assert "only data.KEY=VALUE overrides" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        loader.main(["--shards", spec, "--workers", "3", "--batch", "64"])
    assert "--batch=64 must be a multiple of --workers=3" in capsys.readouterr().err


@pytest.mark.slow
def test_comparison_on_both_shard_sets(tmp_path):
    """All four measurements per round on uniform and realistic shards, open_clip_train included
    (its webdataset 0.2.86 is installed from PyPI into the cache directory on first use)."""
    out, cache = tmp_path / "loader.json", tmp_path / "cache"
    assert comparison.main(["--gen-shards", "1", "--gen-per-shard", "16", *TINY, "--cache-dir", str(cache),
                            "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    env = result["open_clip_train_env"]
    assert "error" not in env and (cache / env["pythonpath"].rsplit("/", 1)[-1] / "webdataset").is_dir()
    assert env["installed"] == ["webdataset==0.2.86"]
    assert "installed" not in comparison.open_clip_train_env(cache)  # the cached directory is reused
    assert set(result["sets"]) == {"uniform", "realistic"}
    for s in result["sets"].values():
        r = s["rounds"][0]
        for name in ("clipscale", "open_clip_train", "wds_decode_crop"):
            check_rate(r[name], samples=16)
        assert r["open_clip_train"]["webdataset"] == "0.2.86"  # the real pipeline, on its own webdataset
        per_core = {name: r[name]["samples_per_s_per_core"] for name in ("clipscale", "open_clip_train",
                                                                         "wds_decode_crop")}
        raw = r["raw"]["samples_per_s"]
        assert r["ratios"]["clipscale_over_open_clip_train_per_core"] == pytest.approx(
            per_core["clipscale"] / per_core["open_clip_train"])
        assert r["ratios"]["clipscale_over_wds_decode_crop_per_core"] == pytest.approx(
            per_core["clipscale"] / per_core["wds_decode_crop"])
        assert r["ratios"]["wds_decode_crop_per_core_over_raw_limit"] == pytest.approx(
            per_core["wds_decode_crop"] / raw)
        target = s["summary"]["targets"]["clipscale_over_open_clip_train_per_core"]
        assert target["met"] == (target["value"] >= 2.0)
        assert s["images"]["samples_in_shards"] == 16 and s["images"]["images_read"] == 16
    assert result["sets"]["uniform"]["images"]["format_share"] == {"jpg": 1.0}


def test_open_clip_train_unavailable_is_reported_not_fatal():
    """Without its environment, open_clip_train's figures and ratios are marked, the others stand."""
    args = comparison.parse_args(TINY)
    r = comparison.open_clip_train_rate(args, spec="unused", total=1, env={"error": "pip: no network"})
    assert r == {"unavailable": "pip: no network"}
    rate = {"samples_per_s": 100.0, "samples_per_s_per_core": 100.0}
    rounds = [{"clipscale": rate, "open_clip_train": r, "wds_decode_crop": rate, "raw": {"samples_per_s": 200.0}}]
    rounds[0]["ratios"] = comparison.ratios(rounds[0])
    summary = comparison.summarize(rounds)
    assert summary["ratios"]["clipscale_over_open_clip_train_per_core"] is None
    assert summary["ratios"]["clipscale_per_core_over_raw_limit"] == 0.5
    assert not summary["targets"]["clipscale_over_open_clip_train_per_core"]["met"]


def test_comparison_errors_name_the_fix(capsys):
    for argv, message in ((["--workers", "3", "--batch", "64"], "--batch=64 must be a multiple of --workers=3"),
                          (["--workers", "4", "--batch", "64", "--gen-shards", "2"], "--gen-shards=2 is fewer")):
        with pytest.raises(SystemExit):
            comparison.parse_args(argv)
        assert message in capsys.readouterr().err


def test_realistic_shape_and_format_distributions():
    rng = np.random.default_rng(0)
    shapes = [realistic_shape(rng) for _ in range(4000)]
    longest = [max(s) for s in shapes]
    aspects = [w / h for w, h in shapes]
    assert 64 <= min(longest) and max(longest) <= 2000
    assert 0.24 < min(aspects) and max(aspects) < 4.1
    assert 300 < statistics.median(longest) < 420  # log-uniform: median near sqrt(64 x 2000) = 358
    assert 0.45 < np.mean([a > 1 for a in aspects]) < 0.55  # portrait and landscape alike
    formats = [realistic_format(rng) for _ in range(4000)]
    assert formats.count("PNG") / 4000 == pytest.approx(0.10, abs=0.02)
    assert formats.count("WEBP") / 4000 == pytest.approx(0.05, abs=0.015)


@pytest.mark.parametrize("kind", ["uniform", "realistic"])
def test_generated_shards_decode(tmp_path, kind):
    spec = write_shards(tmp_path, kind=kind, num_shards=1, per_shard=12, seed=1)
    assert spec == f"{tmp_path}/{{000000..000000}}.tar"
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"000000.tar": 12}
    with tarfile.open(tmp_path / "000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    images = {k.split(".")[0]: (k.split(".")[1], v) for k, v in members.items() if not k.endswith(".txt")}
    captions = {k.split(".")[0]: v.decode() for k, v in members.items() if k.endswith(".txt")}
    assert set(images) == set(captions) and len(images) == 12
    for ext, data in images.values():
        img = Image.open(io.BytesIO(data))
        assert {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext] == img.format
        if kind == "uniform":
            assert img.size == (384, 384)
        else:
            assert 64 <= max(img.size) <= 2000 and max(img.size) / min(img.size) <= 4.1
    lengths = [len(c.split()) for c in captions.values()]
    assert all(5 <= n <= (12 if kind == "uniform" else 70) for n in lengths)
    if kind == "uniform":  # the web-photo average this set stands for: ~50 KB
        assert 35_000 < np.mean([len(d) for _, d in images.values()]) < 65_000
