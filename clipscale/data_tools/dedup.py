"""Exact deduplication in bounded memory: the first occurrence of every hash, partitioned on disk.

A record is (16-byte hash of a key or an image, input index, bucket, position in the bucket), 32
bytes. Records go to FANOUT partition files by the first bits of their hash. Before a partition is
read, one larger than `bound_bytes` is split by the next bits of the hash (recursively), so the
distinct hashes of a partition fit the bound whatever the number of samples. A partition is then
read twice in chunks: first building a table of each hash's earliest record (its distinct hashes,
so a placeholder image repeated 10^7 times costs one entry), then naming every record that is not
in that table. Memory: one chunk plus one partition's distinct hashes, both under the bound.
"""
from __future__ import annotations

import hashlib
import posixpath
import struct
from typing import Callable, Iterator

import fsspec
import numpy as np

RECORD = np.dtype([("h0", "<u8"), ("h1", "<u8"), ("index", "<u8"), ("bucket", "<u4"), ("pos", "<u4")])
FANOUT_BITS = 6
FANOUT = 1 << FANOUT_BITS  # partition files open at once
MAX_DEPTH = 64 // FANOUT_BITS - 1  # the bits of h0 that can still split a partition
PACK = struct.Struct("<QII")


def digest(data: bytes) -> bytes:
    """The 16-byte hash a record carries (blake2b: collisions are out of reach at 10^10 samples)."""
    return hashlib.blake2b(data, digest_size=16).digest()


def partition(h0: int | np.ndarray, depth: int) -> int | np.ndarray:
    """Partition of a hash at a split depth: the next FANOUT_BITS bits of its first 8 bytes."""
    return (h0 >> (64 - FANOUT_BITS * (depth + 1))) & (FANOUT - 1)


class RecordWriter:
    """Records appended to `directory/{0..FANOUT-1}` by the first bits of their hash (files opened on demand)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.fs, root = fsspec.core.url_to_fs(directory)
        self.fs.makedirs(root, exist_ok=True)
        self.files: dict[int, object] = {}

    def add(self, h: bytes, *, index: int, bucket: int, pos: int) -> None:
        self._file(partition(int.from_bytes(h[:8], "little"), 0)).write(h + PACK.pack(index, bucket, pos))

    def add_array(self, records: np.ndarray, *, depth: int) -> None:
        parts = partition(records["h0"], depth)
        for p in np.unique(parts):
            self._file(int(p)).write(records[parts == p].tobytes())

    def _file(self, p: int):
        if p not in self.files:
            self.files[p] = self.fs.open(posixpath.join(self.directory, f"{p:02d}"), "wb")
        return self.files[p]

    def close(self) -> list[str]:
        """Close every file; the partition paths written, in order."""
        for f in self.files.values():
            f.close()
        return [posixpath.join(self.directory, f"{p:02d}") for p in sorted(self.files)]


def read_chunks(path: str, *, chunk_records: int) -> Iterator[np.ndarray]:
    with fsspec.open(path, "rb") as f:
        while data := f.read(chunk_records * RECORD.itemsize):
            yield np.frombuffer(data, dtype=RECORD)


def later_occurrences(paths: list[str], *, bound_bytes: int, emit: Callable[[np.ndarray], None], scratch: str,
                      depth: int = 0) -> None:
    """Call `emit` with the records of every hash after its earliest one (by index), partition by partition;
    partitions over `bound_bytes` are split into sub-partitions under `scratch`."""
    chunk_records = max(1, bound_bytes // (4 * RECORD.itemsize))  # a chunk, its sort and the table fit the bound
    for path in paths:
        fs, local = fsspec.core.url_to_fs(path)
        if fs.size(local) > bound_bytes and depth < MAX_DEPTH:
            sub = posixpath.join(scratch, hashlib.sha1(path.encode()).hexdigest()[:16])
            writer = RecordWriter(sub)
            for chunk in read_chunks(path, chunk_records=chunk_records):
                writer.add_array(chunk, depth=depth + 1)
            later_occurrences(writer.close(), bound_bytes=bound_bytes, emit=emit, scratch=scratch, depth=depth + 1)
            continue
        first = np.empty(0, dtype=RECORD)  # per distinct hash, its earliest record
        for chunk in read_chunks(path, chunk_records=chunk_records):
            both = np.concatenate([first, chunk])
            both = both[np.lexsort((both["index"], both["h1"], both["h0"]))]
            new = np.ones(len(both), dtype=bool)
            new[1:] = (both["h0"][1:] != both["h0"][:-1]) | (both["h1"][1:] != both["h1"][:-1])
            first = both[new]
        earliest = np.sort(first["index"])
        for chunk in read_chunks(path, chunk_records=chunk_records):
            later = chunk[~np.isin(chunk["index"], earliest, assume_unique=True)]
            if len(later):
                emit(later)
