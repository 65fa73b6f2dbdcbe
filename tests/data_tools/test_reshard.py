"""`reshard`: the multiset of samples is kept (minus duplicates), shards are balanced and shuffled."""
import collections
import json

import pytest

from clipscale.data.shards import DataError, read_sizes
import clipscale.data_tools.reshard as reshard_module
from clipscale.data_tools.reshard import reshard, val_split
from tests.data_tools.kit import sample_multiset, wds_samples
from tests.shard_kit import image_bytes, sample_members, write_dataset, write_shard
from tests.unit.test_pipeline import make_loader, take

UNEVEN = [3, 17, 1, 9, 6]


def shard_list(spec_dir, n):
    return [str(spec_dir / f"{i:06d}.tar") for i in range(n)]


def test_reshard_keeps_the_samples_balances_and_shuffles(tmp_path):
    write_dataset(tmp_path / "in", UNEVEN)
    inputs = shard_list(tmp_path / "in", len(UNEVEN))
    result = reshard(inputs, str(tmp_path / "out"), shards=4, seed=1)
    assert result == {"splits": {"": [9, 9, 9, 9]}, "dropped": {}}
    outputs = shard_list(tmp_path / "out", 4)
    assert sample_multiset(outputs) == sample_multiset(inputs)
    assert read_sizes(outputs) == dict(zip(outputs, [9, 9, 9, 9]))
    keys = [s["__key__"] for s in wds_samples(outputs)]
    assert keys != sorted(keys)  # shuffled across the input shards
    assert len({k[:3] for k in keys[:9]}) > 1  # the first output shard mixes input shards
    assert not (tmp_path / "out/.reshard").exists()
    loader = make_loader(f"{tmp_path}/out/{{000000..000003}}.tar", num_streams=4, batch=36, shuffle_buffer=0)
    (batch,) = take(loader, 1)
    assert sorted(batch.keys) == sorted(keys)
    again = reshard(inputs, str(tmp_path / "out"), shards=4, seed=1)  # finished: nothing to do
    assert again == result
    with pytest.raises(DataError, match="not empty"):
        reshard(inputs, str(tmp_path / "out"), shards=5, seed=1)


def test_duplicate_keys_and_images_are_dropped(tmp_path):
    a = write_shard(tmp_path / "a.tar", sample_members("k1", 1) + sample_members("k2", 2))
    b = write_shard(tmp_path / "b.tar", sample_members("k1", 3)  # same key as in a.tar
                    + [("copy.jpg", image_bytes(2)), ("copy.txt", b"same image as k2")]
                    + sample_members("k4", 4) + sample_members("../up", 5))
    result = reshard([str(a), str(b)], str(tmp_path / "out"), shards=2)
    assert result["dropped"] == {"duplicate_key": 1, "duplicate_image": 1, "unsafe_member_name": 1}
    keys = sorted(s["__key__"] for s in wds_samples(shard_list(tmp_path / "out", 2)))
    assert keys == ["k1", "k2", "k4"]
    first_k1 = [s for s in wds_samples(shard_list(tmp_path / "out", 2)) if s["__key__"] == "k1"][0]
    assert first_k1["jpg"] == image_bytes(1)  # the first one is kept
    kept = reshard([str(a), str(b)], str(tmp_path / "captions"), shards=2, drop_duplicate_images=False)
    assert kept["dropped"] == {"duplicate_key": 1, "unsafe_member_name": 1}  # one image, two captions: both kept


def test_val_split_by_key_hash(tmp_path):
    write_dataset(tmp_path / "in", [40, 40])
    inputs = shard_list(tmp_path / "in", 2)
    result = reshard(inputs, str(tmp_path / "out"), shards=5, val_fraction=0.25, seed=3)
    assert sorted(result["splits"]) == ["train", "val"] and len(result["splits"]["val"]) == 1
    train = shard_list(tmp_path / "out/train", 4)
    val = shard_list(tmp_path / "out/val", 1)
    assert all(val_split(s["__key__"], 0.25) for s in wds_samples(val))
    assert not any(val_split(s["__key__"], 0.25) for s in wds_samples(train))
    assert sample_multiset(train) + sample_multiset(val) == sample_multiset(inputs)
    assert 5 <= sum(result["splits"]["val"]) <= 35
    recorded = json.loads((tmp_path / "out/reshard.json").read_text())
    assert recorded["result"] == result
    other = reshard(inputs, str(tmp_path / "other"), shards=5, val_fraction=0.25, seed=4)  # another seed:
    assert other["splits"] == result["splits"]  # the same split, another order


def test_interrupted_reshard_resumes_without_duplicates(tmp_path, monkeypatch):
    write_dataset(tmp_path / "in", UNEVEN)
    inputs = shard_list(tmp_path / "in", len(UNEVEN))
    reshard(inputs, str(tmp_path / "whole"), shards=4, seed=2)

    class CtrlC(reshard_module.ShardWriter):  # Ctrl-C while pass 2 writes its third shard
        def commit(self):
            if self.path.endswith("out/000002.tar"):
                raise KeyboardInterrupt
            super().commit()

    monkeypatch.setattr(reshard_module, "ShardWriter", CtrlC)
    with pytest.raises(KeyboardInterrupt):
        reshard(inputs, str(tmp_path / "out"), shards=4, seed=2)
    monkeypatch.undo()
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.tar")) == ["000000.tar", "000001.tar"]
    assert (out / ".reshard/buckets.json").exists() and not list(out.glob(".*.tmp"))
    first_written = (out / "000000.tar").stat().st_mtime_ns
    reshard(inputs, str(out), shards=4, seed=2)
    assert (out / "000000.tar").stat().st_mtime_ns == first_written  # kept, not rewritten
    for i in range(4):
        assert (out / f"{i:06d}.tar").read_bytes() == (tmp_path / f"whole/{i:06d}.tar").read_bytes()
    assert sample_multiset(shard_list(out, 4)) == sample_multiset(inputs)


@pytest.mark.slow
def test_parallel_reshard_writes_the_same_shards(tmp_path):
    write_dataset(tmp_path / "in", UNEVEN)
    inputs = shard_list(tmp_path / "in", len(UNEVEN))
    for processes in (1, 2):
        reshard(inputs, str(tmp_path / f"p{processes}"), shards=4, val_fraction=0.3, seed=5, processes=processes)
    for split, n in (("train", 3), ("val", 1)):
        for i in range(n):
            assert (tmp_path / f"p1/{split}/{i:06d}.tar").read_bytes() == \
                (tmp_path / f"p2/{split}/{i:06d}.tar").read_bytes()


def test_buckets_stay_under_bucket_mb_whatever_the_number_of_samples(tmp_path, monkeypatch):
    write_dataset(tmp_path / "in", [150, 150])  # ~1.3 KB per sample in memory: ~400 KB in all
    inputs = shard_list(tmp_path / "in", 2)
    held = []
    original = reshard_module.shuffled_leaf

    def measured(leaf, **kw):
        held.append(sum(len(s["__key__"]) + len(s["image"]) + len(s["caption"]) + reshard_module.SAMPLE_OVERHEAD
                        for s in original(leaf, **kw)))
        return original(leaf, **kw)

    monkeypatch.setattr(reshard_module, "shuffled_leaf", measured)
    monkeypatch.setattr(reshard_module, "MAX_OPEN", 2)  # step 1: two buckets of ~200 KB
    result = reshard(inputs, str(tmp_path / "out"), shards=1, seed=1, bucket_mb=0.05)  # 50 KB
    assert result == {"splits": {"": [300]}, "dropped": {}}
    assert sample_multiset(shard_list(tmp_path / "out", 1)) == sample_multiset(inputs)
    assert len(held) >= 12 and max(held) <= 50_000  # buckets split until each fits the bound


def test_duplicates_are_found_across_split_partitions_and_buckets(tmp_path):
    samples = []  # (key, image): every third sample repeats an image, some keys repeat 15 shards later
    for i in range(300):
        key = f"k{i - 150 if i >= 150 and i % 5 == 4 else i:04d}"
        samples.append((key, image_bytes(i // 3 * 3 if i % 3 == 2 else i, size=8)))
    inputs = [str(write_shard(tmp_path / f"{n:02d}.tar", [m for key, image in samples[n * 10:n * 10 + 10]
                                                          for m in ((f"{key}.jpg", image), (f"{key}.txt", b"c"))]))
              for n in range(30)]
    result = reshard(inputs, str(tmp_path / "out"), shards=3, bucket_mb=0.02)
    seen_keys, seen_images, kept = set(), set(), collections.Counter()
    for key, image in samples:  # reference: kept iff the first occurrence of its key and of its image
        if key not in seen_keys and image not in seen_images:
            kept[key] += 1
        seen_keys.add(key)
        seen_images.add(image)
    assert result["dropped"] == {"duplicate_key": 30, "duplicate_image": 300 - 30 - sum(kept.values())}
    assert collections.Counter(s["__key__"] for s in wds_samples(shard_list(tmp_path / "out", 3))) == kept


def test_dedup_partitions_split_until_they_fit(tmp_path):
    from clipscale.data_tools.dedup import RecordWriter, digest, later_occurrences

    values = [i % 7 if i % 2 else i for i in range(2000)]  # heavy repeats of 7 values, plus distinct ones
    writer = RecordWriter(str(tmp_path / "records"))
    for index, v in enumerate(values):
        writer.add(digest(str(v).encode()), index=index, bucket=index % 3, pos=index)
    later = []
    later_occurrences(writer.close(), bound_bytes=2048, emit=lambda r: later.extend(r["index"].tolist()),
                      scratch=str(tmp_path / "scratch"))
    first = {}
    for index, v in enumerate(values):
        first.setdefault(v, index)
    assert sorted(later) == [i for i, v in enumerate(values) if first[v] != i]
    assert list((tmp_path / "scratch").iterdir())  # partitions over 2 KB were split


def test_a_reshard_interrupted_while_settling_starts_that_step_over(tmp_path, monkeypatch):
    write_dataset(tmp_path / "in", UNEVEN)
    inputs = shard_list(tmp_path / "in", len(UNEVEN))
    monkeypatch.setattr(reshard_module, "MAX_OPEN", 2)  # two buckets of ~28 KB, each split
    reshard(inputs, str(tmp_path / "whole"), shards=3, seed=4, bucket_mb=0.01)
    original, calls = reshard_module.split_bucket, []

    def interrupted(*args, **kw):  # Ctrl-C while the second too-large bucket is split
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(reshard_module, "split_bucket", interrupted)
        with pytest.raises(KeyboardInterrupt):
            reshard(inputs, str(tmp_path / "out"), shards=3, seed=4, bucket_mb=0.01)
    assert (tmp_path / "out/.reshard/filled.json").exists() and not (tmp_path / "out/.reshard/buckets.json").exists()
    reshard(inputs, str(tmp_path / "out"), shards=3, seed=4, bucket_mb=0.01)
    for i in range(3):
        assert (tmp_path / f"out/{i:06d}.tar").read_bytes() == (tmp_path / f"whole/{i:06d}.tar").read_bytes()
