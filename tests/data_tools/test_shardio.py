"""Shared pieces: shard listing and its errors, key normalisation, atomic deterministic shard writes."""
import pytest

from clipscale.data.shards import DataError
from clipscale.data_tools.inputs import read_table
from clipscale.data_tools.shardio import ShardWriter, image_extension, list_shards, member_key
from tests.data_tools.kit import tar_members
from tests.shard_kit import image_bytes, write_dataset


def test_shards_are_listed_from_a_directory_or_a_spec_and_errors_name_the_input(tmp_path):
    spec = write_dataset(tmp_path / "d", [1, 2, 3])
    (tmp_path / "d/00000.parquet").write_bytes(b"img2dataset writes these too")
    expected = [str(tmp_path / f"d/{i:06d}.tar") for i in range(3)]
    assert list_shards(str(tmp_path / "d")) == expected
    assert list_shards(spec) == expected
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty is a directory holding no \\*.tar shards"):
        list_shards(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="1 of 4 shards .* do not exist"):
        list_shards(f"{tmp_path}/d/{{000000..000003}}.tar")


def test_keys_are_normalised_and_escaping_ones_refused():
    assert member_key("a/./b") == "a/b"
    assert member_key("plain") == "plain"
    for bad in ("/etc/passwd", "../up", "a/../../up", ".", "nul\0l"):
        assert member_key(bad) is None


def test_image_extension_follows_the_bytes_not_the_name():
    assert image_extension(image_bytes(0, fmt="PNG")) == "png"
    assert image_extension(image_bytes(0, fmt="WEBP")) == "webp"
    assert image_extension(image_bytes(0)) == "jpg"


def test_shard_writes_are_atomic_and_deterministic(tmp_path):
    for name in ("a.tar", "b.tar"):
        with ShardWriter(str(tmp_path / name)) as w:
            w.write("k", {"jpg": b"123", "txt": b"cap"})
            assert not (tmp_path / name).exists() and (tmp_path / f".{name}.tmp").exists()
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    assert tar_members(tmp_path / "a.tar") == [("k.jpg", b"123"), ("k.txt", b"cap")]
    with pytest.raises(RuntimeError), ShardWriter(str(tmp_path / "c.tar")) as w:
        w.write("k", {"jpg": b"1"})
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar", "b.tar"]


def test_unknown_table_format_is_named(tmp_path):
    (tmp_path / "c.xlsx").write_bytes(b"")
    with pytest.raises(DataError, match="c.xlsx: unknown format 'xlsx'"):
        read_table(str(tmp_path / "c.xlsx"), columns=("path",))
