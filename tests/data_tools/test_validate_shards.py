"""`validate`: every bad-sample reason the loader counts, local and remote shards, `--fix` copies."""
import hashlib
import tarfile

import fsspec
import pytest

from clipscale.data.shards import DataError
from clipscale.data_tools.validate import validate_shards
from tests.data_tools.kit import tar_members, wds_samples
from tests.shard_kit import image_bytes, sample_members, write_shard
from tests.unit.test_bad_data import EXPECTED_BAD, GOOD, mixed_shard
from tests.unit.test_pipeline import make_loader, take


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_bad_reason_is_counted_and_fix_keeps_only_good_samples(tmp_path):
    (tmp_path / "in").mkdir()
    mixed = mixed_shard(tmp_path / "in/mixed.tar", tmp_path / "unpickled")
    whole = write_shard(tmp_path / "whole.tar", [m for i in range(4) for m in sample_members(f"t{i}", i)])
    cut = tmp_path / "in/cut.tar"
    with tarfile.open(whole) as tar:
        last_caption = tar.getmembers()[-1]
    cut.write_bytes(whole.read_bytes()[:last_caption.offset_data + 3])  # ends inside the last member
    before = {p: digest(p) for p in (mixed, cut)}

    report = validate_shards([str(mixed), str(cut)], fix_dir=str(tmp_path / "fixed"))
    assert report["bad"] == {**EXPECTED_BAD, "truncated_shard": 1}  # the loader's reasons and counts
    assert report["samples"] == len(GOOD) + 3
    mixed_report = report["shards"][0]
    assert sorted(reason for _, reason in mixed_report["bad"]) == sorted(
        ["empty_image", "not_an_image", "corrupt_image", "decompression_bomb", "empty_caption", "caption_not_utf8"])
    assert ["notimg", "not_an_image"] in mixed_report["bad"]
    assert {p: digest(p) for p in (mixed, cut)} == before  # the input is never modified
    assert not (tmp_path / "unpickled").exists()

    fixed = [str(tmp_path / "fixed/mixed.tar"), str(tmp_path / "fixed/cut.tar")]
    assert sorted(s["__key__"] for s in wds_samples(fixed)) == sorted(GOOD + ["t0", "t1", "t2"])
    assert validate_shards(fixed)["bad"] == {}
    names = [name for name, _ in tar_members(fixed[0])]
    assert "palette.png" in names and "webp.webp" in names and "pk.pyd" not in names  # formats kept, extras dropped
    loader = make_loader(f"{tmp_path}/fixed/{{mixed,cut}}.tar", num_streams=1, batch=len(GOOD) + 3,
                         shuffle_buffer=0)
    (batch,) = take(loader, 1)
    assert sorted(batch.keys) == sorted(GOOD + ["t0", "t1", "t2"])


def test_remote_shards_are_read_through_fsspec(tmp_path):
    local = write_shard(tmp_path / "a.tar", [m for i in range(3) for m in sample_members(f"r{i}", i)]
                        + [("r9.jpg", image_bytes(9)[:200]), ("r9.txt", b"x")])
    with fsspec.open("memory://bucket/a.tar", "wb") as f:
        f.write(local.read_bytes())
    report = validate_shards(["memory://bucket/a.tar"], fix_dir="memory://bucket/fixed")
    assert report["samples"] == 3 and report["bad"] == {"corrupt_image": 1}
    assert fsspec.filesystem("memory").cat_file("/bucket/fixed/sizes.json") == b'{\n "a.tar": 3\n}'


def test_fix_into_the_input_directory_is_refused(tmp_path):
    shard = write_shard(tmp_path / "a.tar", sample_members("x", 0))
    for same in (str(tmp_path), f"{tmp_path}/", f"{tmp_path}/../{tmp_path.name}"):
        with pytest.raises(DataError, match="never modifies its input"):
            validate_shards([str(shard)], fix_dir=same)


def test_a_shard_that_cannot_be_read_is_counted_after_retries(tmp_path):
    report = validate_shards([str(tmp_path / "vanished.tar")])  # listed, then gone before it was read
    assert report == {"samples": 0, "bad": {"unreadable_shard": 1},
                      "shards": [{"url": str(tmp_path / "vanished.tar"), "samples": 0,
                                  "counters": {"unreadable_shard": 1}, "bad": []}]}
