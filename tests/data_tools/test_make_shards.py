"""`make`: image folder + captions -> shards the loader and webdataset read; resume; tables; resizing."""
import csv
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipscale.data.shards import DataError, read_sizes
from clipscale.data_tools.make import ShardTarget, make_shards
from clipscale.data_tools.validate import validate_shards
from tests.data_tools.kit import image_folder, tar_members, wds_samples
from tests.shard_kit import image_bytes
from tests.unit.test_pipeline import make_loader, take


def shard_urls(out, n):
    return [str(out / f"{i:06d}.tar") for i in range(n)]


def test_round_trip_make_validate_loader(tmp_path):
    image_folder(tmp_path / "img", 9)
    (tmp_path / "img/sub0/img000.txt").unlink()  # no caption
    (tmp_path / "img/sub1/img001.jpg").write_bytes(image_bytes(1)[:150])  # truncated
    (tmp_path / "img/sub0/img002.txt").write_text("  ")  # empty caption
    (tmp_path / "img/notes.md").write_text("not an image")  # ignored
    out = tmp_path / "shards"
    summary = make_shards(str(tmp_path / "img"), str(out), target=ShardTarget(samples_per_shard=3))
    skipped = [["sub0/img000.jpg", "missing_caption"], ["sub0/img002.jpg", "empty_caption"],
               ["sub1/img001.jpg", "corrupt_image"]]
    assert summary == {"shards": 2, "samples": 6, "skipped": skipped,
                       "failed": {"missing_caption": 1, "corrupt_image": 1, "empty_caption": 1}}
    urls = shard_urls(out, 2)
    assert read_sizes(urls) == {urls[0]: 3, urls[1]: 3}
    # inputs in sorted order: sub0/img000, 002 (skipped), 004, 006, 008, sub1/img001 (skipped), 003, ...:
    # a shard accounts for the inputs up to the next shard's first sample
    stats = json.loads((out / "000000_stats.json").read_text())
    assert stats == {"count": 6, "successes": 3, "first_index": 0, "end_index": 6, "bytes": stats["bytes"],
                     "failed": {"missing_caption": 1, "empty_caption": 1, "corrupt_image": 1}, "skipped": skipped}

    report = validate_shards(urls)
    assert report["samples"] == 6 and report["bad"] == {}

    samples = wds_samples(urls)  # webdataset itself
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == 6 and keys == sorted(keys)
    by_source = {json.loads(s["json"])["source"]: s for s in samples}
    assert by_source["sub0/img004.jpg"]["txt"] == b"caption number 4"
    assert by_source["sub0/img004.jpg"]["jpg"] == (tmp_path / "img/sub0/img004.jpg").read_bytes()  # bytes kept

    loader = make_loader(f"{out}/{{000000..000001}}.tar", num_streams=2, batch=6, shuffle_buffer=0)
    (batch,) = take(loader, 1)
    assert sorted(batch.keys) == sorted(keys)


def write_table(path, rows, fmt):
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if fmt == "tsv" else ",")
            w.writeheader()
            w.writerows(rows)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_captions_from_every_table_format(tmp_path, fmt):
    paths = image_folder(tmp_path / "img", 5, sidecars=False)
    rows = [{"file": p, "text": f'row {i}, with "quotes"\tand tab' if fmt != "tsv" else f"row {i}"}
            for i, p in enumerate(reversed(paths))]
    write_table(tmp_path / f"captions.{fmt}", rows, fmt)
    out = tmp_path / "shards"
    make_shards(str(tmp_path / "img"), str(out), target=ShardTarget(), captions=str(tmp_path / f"captions.{fmt}"),
                path_column="file", caption_column="text")
    samples = wds_samples(shard_urls(out, 1))
    assert [(json.loads(s["json"])["source"], s["txt"].decode()) for s in samples] == \
        [(r["file"], r["text"]) for r in rows]  # table order, keys 0..4


def test_table_without_the_named_column_names_it(tmp_path):
    image_folder(tmp_path / "img", 2, sidecars=False)
    (tmp_path / "c.csv").write_text("path,caption\nsub0/img000.jpg,hi\n")
    with pytest.raises(DataError, match=r"no column 'text'.*--caption-column"):
        make_shards(str(tmp_path / "img"), str(tmp_path / "out"), target=ShardTarget(),
                    captions=str(tmp_path / "c.csv"), caption_column="text")


def test_resize_and_reencode(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img/big.png").write_bytes(image_bytes(0, size=40, fmt="PNG"))
    (tmp_path / "img/big.txt").write_text("big")
    (tmp_path / "img/small.jpg").write_bytes(image_bytes(1, size=10))
    (tmp_path / "img/small.txt").write_text("small")
    (tmp_path / "img/gif.gif").write_bytes(image_bytes(2, size=10, fmt="GIF", mode="P"))
    (tmp_path / "img/gif.txt").write_text("a gif")
    make_shards(str(tmp_path / "img"), str(tmp_path / "a"), target=ShardTarget(max_side=16))
    resized = {json.loads(s["json"])["source"]: s for s in wds_samples(shard_urls(tmp_path / "a", 1))}
    assert json.loads(resized["big.png"]["json"])["width"] == 16 and "png" in resized["big.png"]  # lossless stays png
    assert resized["small.jpg"]["jpg"] == (tmp_path / "img/small.jpg").read_bytes()  # small enough: untouched
    assert "png" in resized["gif.gif"]  # a format the loader does not select becomes png
    make_shards(str(tmp_path / "img"), str(tmp_path / "b"), target=ShardTarget(quality=50))
    assert all("jpg" in s for s in wds_samples(shard_urls(tmp_path / "b", 1)))


def test_shards_cut_at_a_size_in_mb(tmp_path):
    image_folder(tmp_path / "img", 12)
    out = tmp_path / "shards"
    summary = make_shards(str(tmp_path / "img"), str(out), target=ShardTarget(shard_mb=0.004))
    assert summary["shards"] > 2 and summary["samples"] == 12
    for i in range(summary["shards"]):
        stats = json.loads((out / f"{i:06d}_stats.json").read_text())
        assert stats["bytes"] <= 4000 or stats["successes"] == 1
        assert (out / f"{i:06d}.tar").stat().st_size <= stats["bytes"] + 10240  # + end blocks and padding


def test_interrupted_make_resumes_without_duplicates(tmp_path):
    paths = image_folder(tmp_path / "img", 10, sidecars=False)
    rows = [{"path": p, "caption": f"c{i}"} for i, p in enumerate(paths)]
    rows.insert(7, {"path": "late/arrival.jpg", "caption": "late"})  # missing: the run stops there
    write_table(tmp_path / "c.jsonl", rows, "jsonl")
    target = ShardTarget(samples_per_shard=3)

    def run(out):
        return make_shards(str(tmp_path / "img"), str(out), target=target, captions=str(tmp_path / "c.jsonl"))

    out = tmp_path / "out"
    with pytest.raises(DataError, match="late/arrival.jpg"):
        run(out)
    done = sorted(p.name for p in out.iterdir())
    assert done == ["000000.tar", "000000_stats.json", "000001.tar", "000001_stats.json", "make.json"]  # no tmp
    first_written = (out / "000000.tar").stat().st_mtime_ns
    (tmp_path / "img/late").mkdir()
    (tmp_path / "img/late/arrival.jpg").write_bytes(image_bytes(99))
    (out / ".000002.tar.tmp").write_bytes(b"half a shard")  # as a killed run would leave it
    summary = run(out)
    assert summary["samples"] == 11 and summary["shards"] == 4
    assert (out / "000000.tar").stat().st_mtime_ns == first_written  # kept, not rewritten
    assert not list(out.glob(".*"))
    keys = [s["__key__"] for s in wds_samples(shard_urls(out, 4))]
    assert keys == [f"{i:09d}" for i in range(11)]
    fresh = tmp_path / "fresh"
    run(fresh)  # an uninterrupted run gives the same bytes
    for i in range(4):
        assert (out / f"{i:06d}.tar").read_bytes() == (fresh / f"{i:06d}.tar").read_bytes()


def test_other_parameters_or_a_foreign_directory_are_refused(tmp_path):
    image_folder(tmp_path / "img", 3)
    make_shards(str(tmp_path / "img"), str(tmp_path / "out"), target=ShardTarget(samples_per_shard=2))
    with pytest.raises(DataError, match="samples_per_shard differ"):
        make_shards(str(tmp_path / "img"), str(tmp_path / "out"), target=ShardTarget(samples_per_shard=5))
    (tmp_path / "img/sub0/new.jpg").write_bytes(image_bytes(7))  # the input list changed: indices would shift
    (tmp_path / "img/sub0/new.txt").write_text("new")
    with pytest.raises(DataError, match="inputs, inputs_sha1 differ"):
        make_shards(str(tmp_path / "img"), str(tmp_path / "out"), target=ShardTarget(samples_per_shard=2))
    (tmp_path / "other").mkdir()
    (tmp_path / "other/keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty"):
        make_shards(str(tmp_path / "img"), str(tmp_path / "other"), target=ShardTarget())
    with pytest.raises(DataError, match="quality=0"):
        ShardTarget(quality=0)


@pytest.mark.slow
def test_parallel_make_writes_the_same_bytes(tmp_path):
    image_folder(tmp_path / "img", 8)
    for processes in (1, 2):
        make_shards(str(tmp_path / "img"), str(tmp_path / f"p{processes}"), target=ShardTarget(samples_per_shard=3,
                    max_side=14), processes=processes)
    for i in range(3):
        assert (tmp_path / f"p1/{i:06d}.tar").read_bytes() == (tmp_path / f"p2/{i:06d}.tar").read_bytes()
