"""clipscale's tar member reader against Python's tarfile on the formats shards come in."""
import bz2
import collections
import gzip
import io
import lzma
import tarfile

import pytest

from clipscale.data.shards import BLOCK, TimedReader, decompressed, shard_samples, tar_members

LONG = "d" * 90 + "/" + "k" * 120  # over ustar's 100-byte name: GNU/pax records or the ustar prefix


def archive(fmt: int, *, compress=None) -> bytes:
    """Regular files with short, long, prefixed and non-ASCII names, a directory, links, an empty
    file and one large enough to span many blocks."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        directory = tarfile.TarInfo("sub")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for name, data in [("a.jpg", b"\xff\xd8" + bytes(range(256)) * 40), ("a.txt", b"caption a"),
                           ("sub/" + "p" * 80 + "/b.jpg", b"x" * 513), ("caf\u00e9.txt", "caf\u00e9".encode()),
                           (LONG + ".txt", b"long"), ("empty.txt", b"")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "a.jpg" * 30  # a long link name too
        tar.addfile(link)
        last = tarfile.TarInfo("z.txt")
        last.size = 3
        tar.addfile(last, io.BytesIO(b"end"))
    data = buf.getvalue()
    return compress(data) if compress else data


def with_tarfile(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
def test_members_equal_tarfile(fmt):
    data = archive(fmt)
    want = with_tarfile(data)
    assert len(want) == 7 and any(name.startswith(LONG) for name, _ in want)
    assert list(tar_members(io.BytesIO(data))) == want


def test_ustar_prefix_names():  # ustar's own way to store paths over 100 bytes
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("p" * 120 + "/key.jpg")  # stored as prefix + name
        info.size = 4
        tar.addfile(info, io.BytesIO(b"data"))
    assert list(tar_members(io.BytesIO(buf.getvalue()))) == with_tarfile(buf.getvalue())


def test_metadata_members_are_skipped():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("__meta__", "__meta__/k.txt", "k.txt"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"x"))
    assert [name for name, _ in tar_members(io.BytesIO(buf.getvalue()))] == ["k.txt"]


@pytest.mark.parametrize("cut", ["in-header", "in-data", "before-end-block"])
def test_truncated_archives_raise(cut):
    data = archive(tarfile.PAX_FORMAT)
    end_of_last_member = data.index(b"end" + bytes(509)) + 512
    data = data[:{"in-header": 100, "in-data": 512 + 300, "before-end-block": end_of_last_member}[cut]]
    with pytest.raises(tarfile.ReadError):
        list(tar_members(io.BytesIO(data)))


def test_bad_checksum_raises():
    data = bytearray(archive(tarfile.GNU_FORMAT))
    data[0] ^= 1  # the first header's name
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(tar_members(io.BytesIO(bytes(data))))


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress], ids=["gzip", "bzip2", "xz"])
def test_compressed_shards_through_the_loader_reader(tmp_path, compress):
    data = archive(tarfile.PAX_FORMAT)
    path = tmp_path / "shard.tar.x"
    path.write_bytes(compress(data))
    reader = TimedReader(lambda: open(path, "rb"), timeout_s=5, name=str(path))
    assert list(tar_members(decompressed(reader))) == with_tarfile(data)
    path.write_bytes(compress(data)[:len(compress(data)) // 2])  # a cut compressed stream
    reader = TimedReader(lambda: open(path, "rb"), timeout_s=5, name=str(path))
    with pytest.raises(tarfile.ReadError):
        list(tar_members(decompressed(reader)))


def test_unselected_members_are_skipped_and_malformed_pax_raises():
    data = archive(tarfile.GNU_FORMAT)
    assert [n for n, _ in tar_members(io.BytesIO(data), select=lambda n: n.endswith(".txt"))] == \
        [n for n, _ in with_tarfile(data) if n.endswith(".txt")]
    pax = bytearray(archive(tarfile.PAX_FORMAT))
    at = pax.index(b" path=")
    pax[at - 2:at] = b"zz"  # the record's length is no number
    with pytest.raises(tarfile.ReadError):
        list(tar_members(io.BytesIO(bytes(pax))))


def raw_header(name: bytes, size_field: bytes, kind: bytes = b"0") -> bytes:
    """One ustar header block with a hand-written size field and a valid checksum."""
    header = bytearray(BLOCK)
    header[:len(name)] = name
    header[124:136] = size_field
    header[156:157] = kind
    header[257:263] = b"ustar\x00"
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\x00 " % sum(header)
    return bytes(header)


def pax_archive(records: bytes) -> bytes:
    pad = -len(records) % BLOCK
    member = raw_header(b"k.txt", b"%011o\x00" % 1) + b"x" + bytes(BLOCK - 1)
    return raw_header(b"pax", b"%011o\x00" % len(records), b"x") + records + bytes(pad) + member + bytes(2 * BLOCK)


@pytest.mark.parametrize("records", [b"0 path=a\n", b"-3 =3 x\n", b"99 path=a\n", b"12 size=-9\n", b"9 path=ab"],
                         ids=["zero-length", "negative-length", "past-the-end", "negative-size", "no-newline"])
def test_malformed_pax_records_raise_instead_of_looping(records):
    with pytest.raises(tarfile.ReadError):
        list(tar_members(io.BytesIO(pax_archive(records))))


def test_pax_path_and_size_apply_to_the_member():
    members = list(tar_members(io.BytesIO(pax_archive(b"15 path=long/k\n"))))
    assert members == [("long/k", b"x")]


@pytest.mark.parametrize("kind", [b"0", b"L", b"x"])
def test_a_huge_claimed_size_is_a_corrupt_header_not_an_allocation(kind):
    huge = b"\x80" + (2**44).to_bytes(11, "big")  # GNU base-256 size field
    data = raw_header(b"a.jpg", huge, kind) + bytes(4 * BLOCK)
    stream = gzip.GzipFile(fileobj=io.BytesIO(gzip.compress(data))) if kind == b"0" else io.BytesIO(data)
    with pytest.raises(tarfile.ReadError, match="claims"):
        list(tar_members(stream))


def test_negative_octal_size_raises():
    with pytest.raises(tarfile.ReadError, match="bad number"):
        list(tar_members(io.BytesIO(raw_header(b"a.jpg", b"-0000001000\x00") + bytes(4 * BLOCK))))


def test_a_plain_tar_whose_first_name_looks_like_bzip2_is_read_as_tar(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("BZh91AY.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"jpg"))
    path = tmp_path / "bzh.tar"
    path.write_bytes(buf.getvalue())
    reader = TimedReader(lambda: open(path, "rb"), timeout_s=5, name=str(path))
    assert list(tar_members(decompressed(reader))) == [("BZh91AY.jpg", b"jpg")]


def test_corrupt_bzip2_is_a_truncated_shard_not_a_failing_source(tmp_path):
    data = bytearray(bz2.compress(archive(tarfile.PAX_FORMAT)))
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)  # corrupt bytes that do arrive
    path = tmp_path / "bad.tar.bz2"
    path.write_bytes(bytes(data))
    counters = collections.Counter()
    list(shard_samples(str(path), caption="txt", counters=counters, retries=2, backoff_s=0.01, timeout_s=5))
    assert counters["truncated_shard"] == 1 and counters["unreadable_shard"] == 0
