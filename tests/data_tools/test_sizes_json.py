"""`sizes`: sizes.json from counting or from img2dataset's *_stats.json, read back by the loader."""
import json

from clipscale.data.shards import read_sizes
from clipscale.data_tools.sizes import write_sizes
from tests.shard_kit import sample_members, write_dataset, write_shard

UNEVEN = [4, 0, 11, 7]


def test_counted_sizes_agree_with_the_shards_and_the_loader_reads_them(tmp_path):
    write_dataset(tmp_path, UNEVEN, with_sizes=False)
    urls = [str(tmp_path / f"{i:06d}.tar") for i in range(len(UNEVEN))]
    assert read_sizes(urls) is None
    assert write_sizes(urls) == dict(zip(urls, UNEVEN))
    assert read_sizes(urls) == dict(zip(urls, UNEVEN))


def test_img2dataset_stats_are_used_unless_counting_is_asked(tmp_path):
    write_shard(tmp_path / "00000.tar", [m for i in range(3) for m in sample_members(f"a{i}", i)])
    write_shard(tmp_path / "00001.tar", [m for i in range(2) for m in sample_members(f"b{i}", i)])
    # img2dataset's stats for shard 0 (its count includes failed downloads); none for shard 1
    (tmp_path / "00000_stats.json").write_text(json.dumps({"count": 10, "successes": 3, "failed_to_download": 7}))
    (tmp_path / "sizes.json").write_text(json.dumps({"elsewhere.tar": 5}))
    urls = [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]
    assert write_sizes(urls) == dict(zip(urls, [3, 2]))
    (tmp_path / "00000_stats.json").write_text(json.dumps({"count": 10, "successes": 9}))  # stale stats
    assert write_sizes(urls, count=True) == dict(zip(urls, [3, 2]))
    assert write_sizes(urls) == dict(zip(urls, [9, 2]))
    assert json.loads((tmp_path / "sizes.json").read_text()) == {"elsewhere.tar": 5, "00000.tar": 9, "00001.tar": 2}
