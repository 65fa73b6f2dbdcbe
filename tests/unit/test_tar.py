"""Shards are read by `tarfile`: every format shards come in, and hostile or cut tars neither hang,
nor exhaust memory, nor yield anything `tarfile` itself does not read from the same bytes."""
import bz2
import collections
import gzip
import io
import lzma
import random
import tarfile
import threading

import pytest

from clipscale.data.shards import MAX_META_BYTES, TimedReader, shard_samples, tar_members
from tests.shard_kit import image_bytes

LONG = "d" * 90 + "/" + "k" * 120  # over ustar's 100-byte name: GNU/pax records or the ustar prefix
BLOCK = tarfile.BLOCKSIZE


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


def within(seconds: float, fn):
    """fn() run in a thread that must finish within `seconds` (a hang fails the test instead of stalling it)."""
    result = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    if "error" in result:
        raise result["error"]
    return result["value"]


def read_shard(path, data: bytes) -> tuple[list[dict], collections.Counter]:
    """The samples and counters of the loader's shard reader on a file holding `data`."""
    path.write_bytes(data)
    counters = collections.Counter()
    samples = within(10, lambda: list(shard_samples(str(path), caption="txt", counters=counters, retries=0,
                                                    backoff_s=0.0, timeout_s=5)))
    return samples, counters


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
def test_truncated_archives_raise(cut, tmp_path):
    data = archive(tarfile.PAX_FORMAT)
    end_of_last_member = data.index(b"end" + bytes(509)) + 512
    data = data[:{"in-header": 100, "in-data": 512 + 300, "before-end-block": end_of_last_member}[cut]]
    with pytest.raises(tarfile.ReadError):
        list(tar_members(io.BytesIO(data)))
    assert read_shard(tmp_path / "cut.tar", data)[1]["truncated_shard"] == 1


def test_bad_checksum_raises():
    data = bytearray(archive(tarfile.GNU_FORMAT))
    data[0] ^= 1  # the first header's name
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(tar_members(io.BytesIO(bytes(data))))


def test_a_bad_header_after_the_first_member_is_a_truncated_shard_not_the_end(tmp_path):
    data = bytearray(archive(tarfile.GNU_FORMAT))
    second = data.index(b"a.txt")  # tarfile alone stops here silently, as if the archive ended
    data[second] ^= 1
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(tar_members(io.BytesIO(bytes(data))))
    assert read_shard(tmp_path / "bad.tar", bytes(data)) == ([], {"truncated_shard": 1})  # a.jpg: cut short


@pytest.mark.parametrize("compress", [gzip.compress, bz2.compress, lzma.compress], ids=["gzip", "bzip2", "xz"])
def test_compressed_shards_through_the_loader_reader(tmp_path, compress):
    data = archive(tarfile.PAX_FORMAT)
    path = tmp_path / "shard.tar.x"
    path.write_bytes(compress(data))
    reader = TimedReader(lambda: open(path, "rb"), timeout_s=5, name=str(path))
    assert list(tar_members(reader)) == with_tarfile(data)
    reader.close()
    path.write_bytes(compress(data)[:len(compress(data)) // 2])  # a cut compressed stream
    reader = TimedReader(lambda: open(path, "rb"), timeout_s=5, name=str(path))
    with pytest.raises(tarfile.ReadError):
        list(tar_members(reader))
    reader.close()


def test_unselected_members_are_skipped():
    data = archive(tarfile.GNU_FORMAT)
    assert [n for n, _ in tar_members(io.BytesIO(data), select=lambda n: n.endswith(".txt"))] == \
        [n for n, _ in with_tarfile(data) if n.endswith(".txt")]


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
def test_malformed_pax_records_neither_loop_nor_yield_what_tarfile_does_not(records, tmp_path):
    # tarfile raises on a zero length, and the loader refuses a negative size (tarfile reads an
    # empty member); tarfile ignores the other malformed records, or cuts the name at the record's
    # claimed end, and the loader reads the same member.
    data = pax_archive(records)
    try:
        want = with_tarfile(data)
    except tarfile.TarError:
        want = None
    if want is None or records.startswith(b"12 size=-9"):
        with pytest.raises(tarfile.ReadError):
            within(5, lambda: list(tar_members(io.BytesIO(data))))
        assert read_shard(tmp_path / "pax.tar", data)[1] == {"truncated_shard": 1}
    else:
        assert within(5, lambda: list(tar_members(io.BytesIO(data)))) == want and want[0][1] == b"x"


def test_pax_path_and_size_apply_to_the_member():
    members = list(tar_members(io.BytesIO(pax_archive(b"15 path=long/k\n"))))
    assert members == [("long/k", b"x")]


@pytest.mark.parametrize("kind", [b"0", b"L", b"x"])
def test_a_huge_claimed_size_is_a_corrupt_header_not_an_allocation(kind, tmp_path):
    huge = b"\x80" + (2**44).to_bytes(11, "big")  # GNU base-256 size field
    data = raw_header(b"a.jpg", huge, kind) + bytes(4 * BLOCK)
    compressed = gzip.compress(data) if kind == b"0" else data
    with pytest.raises(tarfile.ReadError, match="claims"):
        list(tar_members(io.BytesIO(compressed)))
    assert read_shard(tmp_path / "huge.tar", compressed)[1] == {"truncated_shard": 1}


def test_a_pax_size_record_over_the_cap_is_refused_before_reading():
    with pytest.raises(tarfile.ReadError, match="claims"):
        list(tar_members(io.BytesIO(pax_archive(b"21 size=17592186044416\n"))))  # 2**44


def test_negative_octal_size_raises(tmp_path):
    data = raw_header(b"a.jpg", b"-0000001000\x00") + bytes(4 * BLOCK)
    with pytest.raises(tarfile.ReadError, match="claims -512 bytes"):
        list(tar_members(io.BytesIO(data)))
    assert read_shard(tmp_path / "neg.tar", data)[1] == {"truncated_shard": 1}


def test_pax_headers_of_backtracking_digits_take_bounded_time(tmp_path):
    # CPython < 3.11.10 searches pax headers with a regex that backtracks quadratically on digits.
    at_cap = b"%d" % MAX_META_BYTES + b"1" * (MAX_META_BYTES - 6) + b"\n"
    data = pax_archive(at_cap[:MAX_META_BYTES])
    within(2, lambda: list(tar_members(io.BytesIO(data))))
    with pytest.raises(tarfile.ReadError, match="claims"):  # a longer header is refused unread
        list(tar_members(io.BytesIO(pax_archive(b"1" * (MAX_META_BYTES + 1)))))


def test_a_chain_of_pax_headers_is_a_truncated_shard_not_a_crash(tmp_path):
    one = pax_archive(b"10 path=k\n")[:2 * BLOCK]  # a pax header whose member is the next pax header
    samples, counters = read_shard(tmp_path / "chain.tar", one * 5000 + pax_archive(b"10 path=k\n"))
    assert samples == [] and counters == {"truncated_shard": 1}


def test_a_plain_tar_whose_first_name_looks_like_bzip2_is_read_as_tar(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("BZh91AY.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"jpg"))
    path = tmp_path / "bzh.tar"
    path.write_bytes(buf.getvalue())
    reader = TimedReader(lambda: open(path, "rb"), timeout_s=5, name=str(path))
    assert list(tar_members(reader)) == [("BZh91AY.jpg", b"jpg")]
    reader.close()


def test_corrupt_bzip2_is_a_truncated_shard_not_a_failing_source(tmp_path):
    data = bytearray(bz2.compress(archive(tarfile.PAX_FORMAT)))
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)  # corrupt bytes that do arrive
    path = tmp_path / "bad.tar.bz2"
    path.write_bytes(bytes(data))
    counters = collections.Counter()
    list(shard_samples(str(path), caption="txt", counters=counters, retries=2, backoff_s=0.01, timeout_s=5))
    assert counters["truncated_shard"] == 1 and counters["unreadable_shard"] == 0


# --- differential: on mutated tars the reader yields only what tarfile itself reads -------------

def sample_tar() -> tuple[bytes, list[tuple[int, int]]]:
    """A small pax shard (samples, a long and a non-ASCII key, an orphan, a pickle-like member) and
    the (start, end) of every header block."""
    buf = io.BytesIO()
    members = [(f"k{i}.jpg", image_bytes(i, size=8)) for i in range(4)]
    members = [m for i, m in enumerate(members) for m in (m, (f"k{i}.txt", f"caption {i}".encode()))]
    members += [(LONG + ".jpg", b"\xff\xd8long"), (LONG + ".txt", b"long"), ("caf\u00e9.jpg", b"\xff\xd8"),
                ("caf\u00e9.txt", b"cafe"), ("k9.pyd", b"\x80\x04N."), ("k9.txt", b"orphan")]
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        headers = [(m.offset, m.offset_data) for m in tar.getmembers()]
    return data, headers


def mutate(data: bytes, headers: list[tuple[int, int]], rng: random.Random) -> bytes:
    out = bytearray(data)
    kind = rng.choice(["truncate", "flip-header", "size", "flip-anywhere", "gzip-cut"])
    if kind == "truncate":
        return bytes(out[:rng.randrange(len(out))])
    if kind == "gzip-cut":
        packed = gzip.compress(data)
        return packed[:rng.randrange(len(packed))]
    if kind == "flip-anywhere":
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
        return bytes(out)
    start, end = rng.choice(headers)
    block = start + BLOCK * rng.randrange((end - start) // BLOCK)
    if kind == "flip-header":
        for _ in range(rng.randint(1, 4)):
            out[block + rng.randrange(BLOCK)] ^= 1 << rng.randrange(8)
        return bytes(out)
    size = rng.choice([b"%011o\x00" % rng.randrange(1 << 33), b"-%010o\x00" % rng.randrange(1 << 20),
                       b"\x80" + rng.randrange(1 << 80).to_bytes(11, "big"), bytes(rng.randrange(256) for _ in range(12))])
    out[block + 124:block + 136] = size
    out[block + 148:block + 156] = b" " * 8  # a valid checksum, so that the size itself is what is tested
    out[block + 148:block + 156] = b"%06o\x00 " % sum(out[block:block + BLOCK])
    return bytes(out)


def tarfile_reads(data: bytes) -> list[tuple[str, bytes]]:
    """The regular members `tarfile` reads from `data` (random access, so a claimed size cannot make it
    loop), up to the first error."""
    read = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for member in tar:
                if member.isreg():
                    read.append((member.name, tar.extractfile(member).read()))
    except Exception:  # noqa: BLE001 - whatever tarfile stops at, it read these
        pass
    return read


def test_mutated_tars_yield_only_what_tarfile_reads(tmp_path):
    data, headers = sample_tar()
    kinds = collections.Counter()
    for case in range(300):
        rng = random.Random(case)
        mutated = mutate(data, headers, rng)
        samples, counters = read_shard(tmp_path / "mutated.tar", mutated)
        members = tarfile_reads(mutated)
        at = 0  # each sample's members are among tarfile's, after the previous sample's
        for sample in samples:
            found = [next((i for i in range(at, len(members)) if members[i][1] == sample[field]
                           and members[i][0].rsplit(".", 1)[0] == sample["__key__"]), None)
                     for field in ("image", "caption")]
            assert None not in found, (case, sample["__key__"])
            at = max(found) + 1
        kinds["whole" if len(samples) == 6 else "part" if samples else "none"] += 1
        kinds["truncated"] += counters["truncated_shard"]
    assert kinds["part"] > 30 and kinds["none"] > 30 and kinds["truncated"] > 100  # the mutations bite
