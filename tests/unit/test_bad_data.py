"""Bad shards and samples are skipped and counted per reason; too many stop the run clearly."""
import collections
import os
import pickle
import struct
import threading
import time
import zlib

import pytest

from clipscale.data.shards import DataError, shard_samples
from tests.shard_kit import FlakyFileSystem, image_bytes, sample_members, write_shard
from tests.unit.test_pipeline import counters, host_images, make_loader, take


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims `width` x `height` pixels."""
    data = bytearray(image_bytes(0, size=1, fmt="PNG"))
    ihdr = b"IHDR" + struct.pack(">II", width, height) + data[24:29]
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


class Unpickled:
    """Unpickling this writes a file: the loader must never do it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def good(key, seed, **kw):
    return [(f"{key}.{kw.get('ext', 'jpg')}", kw.get("data") or image_bytes(seed)), (f"{key}.txt", f"a {key}".encode())]


def mixed_shard(path, marker):
    members = good("good0", 0)
    members += good("cmyk", 1, data=image_bytes(1, mode="CMYK"))
    members += good("palette", 2, ext="png", data=image_bytes(2, fmt="PNG", mode="P"))
    members += good("rgba", 3, ext="png", data=image_bytes(3, fmt="PNG", mode="RGBA"))
    members += good("la", 4, ext="png", data=image_bytes(4, fmt="PNG", mode="LA"))
    members += good("i16", 5, ext="png", data=image_bytes(5, fmt="PNG", mode="I;16"))
    members += good("webp", 6, ext="webp", data=image_bytes(6, fmt="WEBP"))
    members += [("pk.jpg", image_bytes(7)), ("pk.txt", b"a pickle"), ("pk.pyd", pickle.dumps(Unpickled(marker)))]
    members += [("empty.jpg", b""), ("empty.txt", b"x")]
    members += [("notimg.jpg", b"this is text"), ("notimg.txt", b"x")]
    members += [("corrupt.jpg", image_bytes(8)[:200]), ("corrupt.txt", b"x")]
    members += [("bomb.png", bomb_png()), ("bomb.txt", b"x")]
    members += [("nocap.jpg", image_bytes(9))]
    members += [("emptycap.jpg", image_bytes(10)), ("emptycap.txt", b"  \n")]
    members += [("badutf.jpg", image_bytes(11)), ("badutf.txt", b"\xff\xfe\xfa")]
    members += [("noimg.txt", b"no image")]
    members += good("dup", 12) + [("dup.jpg", image_bytes(13))]
    members += good("good0", 14)
    members += good("../evil", 15) + good("/abs/evil", 16)
    members += good("last", 17)
    return write_shard(path, members)


EXPECTED_BAD = {"empty_image": 1, "not_an_image": 1, "corrupt_image": 1, "decompression_bomb": 1,
                "missing_caption": 1, "empty_caption": 1, "caption_not_utf8": 1, "missing_image": 1,
                "duplicate_key": 2, "unsafe_member_name": 2}
GOOD = ["good0", "cmyk", "palette", "rgba", "la", "i16", "webp", "pk", "last"]


def test_each_bad_sample_is_skipped_and_counted(tmp_path):
    marker = tmp_path / "unpickled"
    spec = str(mixed_shard(tmp_path / "mixed.tar", marker))
    loader = make_loader(spec, num_streams=1, batch=len(GOOD), shuffle_buffer=0, train_num_samples=40,
                         max_bad_fraction=1.0)
    (batch,) = take(loader, 1)
    assert sorted(batch.keys) == sorted(GOOD)
    assert host_images(batch).shape == (len(GOOD), 3, 16, 16)
    assert counters(loader) == {"samples": len(GOOD), **EXPECTED_BAD}
    assert not marker.exists()


def test_truncated_failing_and_stalled_shards_are_skipped(tmp_path):
    whole = write_shard(tmp_path / "whole.tar", [m for i in range(6) for m in sample_members(f"t{i}", i)])
    data = whole.read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[:len(data) * 2 // 3])
    flag = tmp_path / "failed_once"
    flaky = f"pipe:sh -c 'if [ -e {flag} ]; then cat {whole}; else touch {flag}; exit 1; fi'"
    spec = "::".join([str(tmp_path / "cut.tar"), "pipe:exit 3", "pipe:sleep 5", flaky])
    loader = make_loader(spec, num_streams=1, batch=2, shuffle_buffer=0, train_num_samples=24,
                         shard_retries=1, retry_backoff_s=0.01, read_timeout_s=0.5, block_shards=4)
    seen = [k for b in take(loader, 5) for k in b.keys]  # the flaky shard's 6 and the cut one's first 4
    assert set(seen) == {f"t{i}" for i in range(6)} and len(seen) == 10
    counted = counters(loader)
    assert counted["truncated_shard"] == 1 and counted["unreadable_shard"] == 2
    assert counted["samples"] == 10 and flag.exists()


def test_too_many_bad_samples_stop_with_the_reasons(tmp_path):
    members = [m for i in range(150) for m in (sample_members(f"k{i}", i) if i % 2 else
                                                [(f"k{i}.jpg", b"garbage"), (f"k{i}.txt", b"x")])]
    spec = str(write_shard(tmp_path / "bad.tar", members))
    loader = make_loader(spec, num_streams=1, batch=60, shuffle_buffer=0, train_num_samples=150,
                         max_bad_fraction=0.2)
    with pytest.raises(DataError, match=r"stream 0: \d+ of \d+ samples were bad \(not_an_image=\d+\)"):
        take(loader, 2)


def test_no_readable_shard_stops_the_run(tmp_path):
    loader = make_loader("pipe:exit 1::pipe:exit 2", num_streams=1, batch=2, train_num_samples=8,
                         shard_retries=0, max_failed_shards=4)
    with pytest.raises(DataError, match="4 shards in a row gave no sample"):
        take(loader, 1)


def read(url, **kw):
    counters = collections.Counter()
    keys = [s["__key__"] for s in shard_samples(url, caption="txt", counters=counters,
                                                **{"retries": 1, "backoff_s": 0.0, "timeout_s": 5, **kw})]
    return keys, counters


def test_a_retried_shard_counts_its_bad_samples_once(tmp_path):
    members = [("orphan.txt", b"no image")] + [m for i in range(30) for m in sample_members(f"k{i}", i)]
    path = write_shard(tmp_path / "flaky.tar", members)
    # tarfile reads 10 KiB at a time: this fails well after the orphan and several samples were handled
    FlakyFileSystem.fail_after[str(path)] = path.stat().st_size * 3 // 4
    keys, counters = read(f"flaky://{path}")
    assert str(path) not in FlakyFileSystem.fail_after  # it did fail once
    assert keys == [f"k{i}" for i in range(30)] and counters == {"missing_image": 1}


def children_running(marker: str) -> list[str]:
    """Command lines of running processes that contain `marker`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline:
            found.append(cmdline)
    return found


def test_a_stalled_shard_leaves_no_thread_open_file_or_process_behind():
    threads, fds = threading.active_count(), len(os.listdir("/proc/self/fd"))
    start = time.monotonic()
    # the command starts a child of its own: the whole group must go, or the pipe stays open
    keys, counters = read("pipe:sleep 37.25 | cat", retries=1, timeout_s=0.3)
    assert keys == [] and counters == {"unreadable_shard": 1}
    assert time.monotonic() - start < 5
    assert threading.active_count() == threads and len(os.listdir("/proc/self/fd")) == fds
    deadline = time.monotonic() + 2  # SIGKILL was sent: the processes are gone once the kernel reaps them
    while children_running("sleep 37.25") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert children_running("sleep 37.25") == []



def test_a_shard_that_does_not_exist_counts_at_once_without_retries(tmp_path):
    start = time.monotonic()
    keys, counters = read(str(tmp_path / "missing.tar"), retries=3, backoff_s=30.0)
    assert keys == [] and counters == {"unreadable_shard": 1}
    assert time.monotonic() - start < 5  # retrying would sleep 30 s first
