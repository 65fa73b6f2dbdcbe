"""`clipscale bench loader` at toy size: JSON structure, finite positive figures, consistent ratios
and image statistics checked against the shards' own bytes. No timing assertions."""
import io
import json
import math
import tarfile

import numpy as np
import pytest
from PIL import Image

from clipscale.bench.loader import main, natural_jpeg
from tests.shard_kit import write_dataset

TINY = ["--workers", "1", "--batch", "8", "--samples", "32", "--repeats", "1"]


def check_payload(result: dict, *, rounds: int) -> None:
    assert result["benchmark"] == "loader" and "uint8" in result["method"]
    assert {"torch", "threads", "cpu_count"} <= set(result["environment"])
    assert len(result["rounds"]) == rounds
    for r in result["rounds"]:
        for name in ("clipscale", "reference", "raw"):
            for key in ("samples", "seconds", "samples_per_s"):
                assert math.isfinite(r[name][key]) and r[name][key] > 0, (name, key, r[name])
            assert r[name]["samples"] >= result["arguments"]["samples"]
            assert 0 <= r[name]["other_processes_cpu_fraction"] < 2  # a share of the CPUs (sampling slack)
            assert r[name]["samples_per_s"] == pytest.approx(r[name]["samples"] / r[name]["seconds"])
        workers = result["arguments"]["workers"]
        per_core = r["clipscale"]["samples_per_s"] / workers
        assert r["ratios"]["clipscale_over_reference_per_core"] == pytest.approx(
            per_core / (r["reference"]["samples_per_s"] / workers))
        assert r["ratios"]["clipscale_per_core_over_raw_limit"] == pytest.approx(per_core / r["raw"]["samples_per_s"])
    summary = result["summary"]
    for key, target in (("clipscale_over_reference_per_core", 2.0), ("clipscale_per_core_over_raw_limit", 0.8)):
        t = summary["targets"][key]
        assert math.isfinite(t["value"]) and t["value"] > 0 and t["target"] == target
        assert t["met"] == (t["value"] >= target)
    for key in ("clipscale_samples_per_s", "reference_samples_per_s_per_core", "raw_limit_samples_per_s"):
        assert math.isfinite(summary[key]) and summary[key] > 0


@pytest.mark.slow
def test_generated_shards(tmp_path, capsys):
    out = tmp_path / "loader.json"
    assert main(["--image-px", "64", "--gen-shards", "1", "--gen-per-shard", "32", *TINY, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    check_payload(result, rounds=1)
    images = result["images"]
    assert images["generated"] and images["shards"] == 1 and images["images_in_shards"] == 32
    assert images["mean_width_px"] == images["mean_height_px"] == 64
    assert "clipscale_over_reference_per_core" in capsys.readouterr().out


@pytest.mark.slow
def test_given_shards_image_stats(tmp_path):
    spec = write_dataset(tmp_path / "shards", [12, 10])
    out = tmp_path / "loader.json"
    assert main(["--shards", spec, *TINY, "--samples", "16", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    check_payload(result, rounds=1)
    sizes = []
    for path in sorted((tmp_path / "shards").glob("*.tar")):
        with tarfile.open(path) as tar:
            sizes += [m.size for m in tar.getmembers() if m.name.endswith(".jpg")]
    images = result["images"]
    assert not images["generated"] and images["shards"] == 2 and images["images_in_shards"] == len(sizes)
    assert images["images_read"] == 16  # raw loop keeps at most --samples images in memory
    assert images["mean_image_bytes"] == pytest.approx(np.mean(sizes[:16]))


def test_natural_jpeg_is_web_sized():
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((768, 768, 3), dtype=np.float32)
    blobs = [natural_jpeg(rng, px=384, noise=noise) for _ in range(12)]
    assert all(Image.open(io.BytesIO(b)).size == (384, 384) for b in blobs)
    assert 35_000 < np.mean([len(b) for b in blobs]) < 65_000  # the "~50 KB" photos


def test_errors_name_the_fix(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--workers", "3", "--batch", "64"])
    assert "--batch=64 must be a multiple of --workers=3" in capsys.readouterr().err
    spec = write_dataset(tmp_path / "one", [4])
    with pytest.raises(SystemExit, match="fewer than --workers=2"):
        main(["--shards", spec, "--workers", "2"])
