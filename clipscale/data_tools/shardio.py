"""Shared pieces of the data tools: listing shards, writing them atomically, parallel maps.

Shards are read only through the loader's own reader (`clipscale.data.shards.shard_samples`), so a
tool sees exactly the samples, and counts exactly the bad ones, that training would. Shards are
written with stdlib `tarfile` under a hidden temporary name in the output directory and renamed
when complete: an interrupted tool never leaves a half-written shard under a final name.
"""
from __future__ import annotations

import collections
import io
import itertools
import json
import posixpath
import struct
import tarfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any, Callable, Iterable, Iterator

import fsspec
from tqdm import tqdm

from clipscale.data.shards import DataError, expand_sources, shard_samples

READ = {"retries": 2, "backoff_s": 1.0, "timeout_s": 120.0}  # shard_samples' retry policy in the tools
WINDOW = 1024  # items handed to a process pool at a time: bounds the results held in memory
IMAGE_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # formats the loader selects by extension


def list_shards(spec: str) -> list[str]:
    """Shard URLs of a spec as the loader reads `data.train_shards` (a directory of `*.tar` such as an
    img2dataset output folder, a glob, a brace spec; `::` sources joined); errors name what is missing."""
    urls = [u for source in expand_sources(spec, field="SHARDS") for u in source]
    missing = [u for u in urls if not u.startswith("pipe:") and not _exists(u)]
    if missing:
        raise DataError(f"{len(missing)} of {len(urls)} shards of {spec!r} do not exist, e.g. {missing[0]}; "
                        "check the path and the brace range")
    return urls


def _exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def is_shards(source: str) -> bool:
    """Whether `source` names shards (a spec ending in .tar, a glob, or a directory holding *.tar)
    rather than images."""
    if source.endswith(".tar") or any(c in source for c in "{*?["):
        return True
    fs, path = fsspec.core.url_to_fs(source)
    return fs.isdir(path) and bool(fs.glob(posixpath.join(path, "*.tar")))


def read_shard(url: str, *, caption: str, counters: collections.Counter) -> Iterator[dict[str, Any]]:
    """Raw samples {"__key__", "image", "caption"} of one shard, bad ones counted, as the loader reads them."""
    return shard_samples(url, caption=caption, counters=counters, **READ)


def caption_extension(caption: str) -> str:
    """The member extension a caption is stored under: `txt`, or `json` for `json:FIELD`."""
    return "json" if caption.startswith("json:") else caption


def image_extension(data: bytes) -> str:
    """The extension of image bytes by their magic number; unknown bytes keep the loader's default
    `jpg` (the loader decodes by content, so a mislabelled file is counted just as before)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "jpg"


def member_key(key: str) -> str | None:
    """A key normalised for use inside a tar (`a/./b` -> `a/b`); None for absolute or `..` keys,
    which could escape a directory if someone extracted the tar. Keys never become local paths here."""
    key = posixpath.normpath(key)
    if key.startswith("/") or key == "." or ".." in key.split("/") or "\0" in key:
        return None
    return key


USTAR = struct.Struct("100s8s8s8s12s12s8s1s100s6s2s32s32s8s8s155s12x")


def ustar_header(name: bytes, size: int) -> bytes:
    """The 512-byte ustar header `tarfile` writes for a regular file `name` (ASCII, <= 100 bytes) of `size`
    bytes with ShardWriter's fixed metadata (mode 0644, uid/gid 0, mtime 0)."""
    header = USTAR.pack(name, b"0000644\0", b"0000000\0", b"0000000\0", b"%011o\0" % size, b"00000000000\0",
                        b" " * 8, tarfile.REGTYPE, b"", tarfile.POSIX_MAGIC[:6], tarfile.POSIX_MAGIC[6:], b"", b"",
                        b"", b"", b"")
    return header[:148] + b"%06o\0 " % sum(header) + header[156:]


class TempFile:
    """A file written as `.NAME.tmp` next to `path` (any fsspec URL) that appears under `path` only on
    `commit()`: a run killed mid-write leaves no partial file under the final name."""

    def __init__(self, path: str) -> None:
        self.fs, self.path = fsspec.core.url_to_fs(path)
        directory, name = posixpath.split(self.path)
        self.fs.makedirs(directory, exist_ok=True)
        self.tmp = posixpath.join(directory, f".{name}.tmp")
        self.file = self.fs.open(self.tmp, "wb")

    def commit(self) -> None:
        self.file.close()
        self.fs.mv(self.tmp, self.path)

    def abort(self) -> None:
        """Drop the file: its temporary file is removed and nothing appears under its final name."""
        self.file.close()
        if self.fs.exists(self.tmp):
            self.fs.rm(self.tmp)


class ShardWriter(TempFile):
    """One tar shard written to `.NAME.tmp` next to `path` and renamed to `path` by `commit()`.

    Members carry fixed metadata (mtime 0, mode 0644), so equal samples give equal bytes. Use as a
    context manager: leaving it with an exception removes the temporary file.
    """

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.PAX_FORMAT)
        self.samples, self.bytes = 0, 0

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        """Add one sample: a member `{key}.{ext}` per field."""
        for ext, data in fields.items():
            name = f"{key}.{ext}"
            if name.isascii() and len(name) <= 100:  # the common case, 5x faster than tarfile's own header
                self.tar.fileobj.write(ustar_header(name.encode(), len(data)) + data + b"\0" * (-len(data) % 512))
                self.tar.offset += 512 + len(data) + (-len(data) % 512)
            else:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                self.tar.addfile(info, io.BytesIO(data))
            self.bytes += 512 + len(data) + (-len(data) % 512)
        self.samples += 1

    def commit(self) -> None:
        self.tar.close()
        super().commit()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.commit()
        except BaseException:
            self.abort()
            raise


def remove_temporary(directory: str) -> None:
    """Remove the `.*.tmp` files an interrupted writer left in `directory`."""
    fs, path = fsspec.core.url_to_fs(directory)
    if not fs.exists(path):
        return
    for tmp in fs.glob(posixpath.join(path, ".*.tmp")):
        fs.rm(tmp)


def write_text(path: str, text: str) -> None:
    """Write a text file atomically (temporary name, then rename)."""
    fs, path = fsspec.core.url_to_fs(path)
    directory, name = posixpath.split(path)
    fs.makedirs(directory, exist_ok=True)
    tmp = posixpath.join(directory, f".{name}.tmp")
    with fs.open(tmp, "w") as f:
        f.write(text)
    fs.mv(tmp, path)


def write_json(path: str, value: Any) -> None:
    """Write JSON atomically."""
    write_text(path, json.dumps(value, indent=1, sort_keys=True))


def read_json(path: str) -> Any | None:
    """A JSON file's value; None if it does not exist; an error naming the file if it is not JSON."""
    fs, local = fsspec.core.url_to_fs(path)
    if not fs.exists(local):
        return None
    try:
        with fs.open(local, "r") as f:
            return json.load(f)
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON ({e}); delete or repair it") from None


def parallel_map(fn: Callable, items: Iterable, *, processes: int, desc: str, total: int | None = None,
                 unit: str = "it") -> Iterator:
    """`map(fn, items)` in order over `processes` worker processes (inline for 1), with a progress bar.

    Items go to the pool in windows of WINDOW, so memory stays bounded for any number of items.
    Workers are spawned, not forked: the parent may hold torch and reader threads.
    """
    bar = tqdm(total=total, desc=desc, unit=unit, disable=None)
    try:
        if processes <= 1:
            for item in items:
                yield fn(item)
                bar.update()
            return
        with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
            items = iter(items)
            while window := list(itertools.islice(items, WINDOW)):
                for result in pool.map(fn, window, chunksize=max(1, len(window) // (4 * processes))):
                    yield result
                    bar.update()
    finally:
        bar.close()

