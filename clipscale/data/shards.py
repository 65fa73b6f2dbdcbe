"""Shards: spec expansion, sizes, and reading one shard's raw samples safely.

Members are read by Python's streaming `tarfile` (`mode="r|*"`: ustar, GNU and pax tars, plain or
gzip/bzip2/xz-compressed). clipscale adds only what `tarfile` leaves out: a cap on every size a
header claims, checked before anything is read; telling a cut or corrupt shard from a whole one
(`tarfile` ends the archive silently at a bad header); grouping members into samples; bad-sample
accounting; and retries of a source that fails or stalls, resuming after what was already handled.
Reading never decodes pickles and never writes files: only image and caption members are read, as bytes.
"""
from __future__ import annotations

import collections
import json
import logging
import lzma
import os
import posixpath
import queue
import re
import signal
import tarfile
import threading
import time
import zlib
from typing import Any, BinaryIO, Callable, Iterator

import fsspec
from webdataset import utils as wds_utils
from webdataset.gopen import Pipe
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from clipscale.errors import InputError

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CHUNK_BYTES = 1 << 20
META_NAME = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members (`__key__`, ...)
MAX_MEMBER_BYTES = 256 << 20  # a member claiming more is taken as a corrupt header
MAX_META_BYTES = 8 << 10  # GNU long-name and pax headers; also bounds the backtracking of the pax
# parser of CPython < 3.11.10 (CVE-2024-6232), quadratic in a header's length: ~0.1 s at this cap
META_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
              tarfile.SOLARIS_XHDTYPE)
FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)  # sparse files, links and devices are skipped
# What corrupt or cut bytes make tarfile and the decompressors raise (a chain of pax headers recurses).
BAD_BYTES = (tarfile.TarError, EOFError, ValueError, RecursionError, zlib.error, lzma.LZMAError)
JOIN_TIMEOUT_S = 5.0  # how long closing a shard waits for its reader thread to end


class DataError(InputError):
    """Shards cannot be used as configured; the message names the spec or file."""


class BadSample(Exception):
    """One sample cannot be used; it is skipped and counted under `reason` (a short snake_case name)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class ShardStalled(OSError):
    """A shard delivered no bytes within `read_timeout_s`."""


def expand_sources(spec: str, *, field: str = "data.train_shards") -> list[list[str]]:
    """`a/{000..009}.tar::b/*.tar::c/` -> shard URLs per `::`-separated source, in a stable order: braces
    expanded (in their order), fsspec globs and directories (their `*.tar`) listed sorted. `field`
    names the spec in errors."""
    sources = [[url for part in expand_urls(source) for url in _listed(part, spec=spec, field=field)]
               for source in spec.split("::")]
    if not all(sources):
        raise DataError(f"{field}={spec!r}: a `::` source expands to no shard")
    return sources


def _listed(url: str, *, spec: str, field: str) -> list[str]:
    """The shard URLs one expanded name stands for: a glob's matches, a directory's `*.tar`, else itself
    (a missing shard is reported when it is checked or read)."""
    if url.startswith("pipe:"):
        return [url]
    is_glob = "*" in url or (not url.startswith(("http://", "https://")) and re.search(r"[?\[]", url))
    if not is_glob and url.endswith(".tar"):
        return [url]
    fs, path = fsspec.core.url_to_fs(url)
    if is_glob:
        pattern, what = path, "matches no file"
    elif fs.isdir(path):
        pattern, what = posixpath.join(path, "*.tar"), "is a directory holding no *.tar shards"
    else:
        return [url]
    matches = sorted(fs.unstrip_protocol(p) if "://" in url else p for p in fs.glob(pattern))
    if not matches:
        raise DataError(f"{field}={spec!r}: {url} {what}; check the path, or give a directory of shards, a glob "
                        "such as dir/*.tar or a brace spec such as dir/{000000..000009}.tar")
    return matches


def shard_weights(sources: list[list[str]], weights: tuple[float, ...] | None, *, spec: str) -> list[float]:
    """Sampling weight of every shard: its source's weight (one per `::` source)."""
    weights = weights or (1.0,) * len(sources)
    if len(weights) != len(sources) or min(weights) < 0 or max(weights) <= 0:
        raise DataError(f"data.train_weights={list(weights)} must give one non-negative weight per "
                        f"`::` source of data.train_shards={spec!r} ({len(sources)} sources), not all zero")
    return [w for source, w in zip(sources, weights) for _ in source]


def check_first_shards(sources: list[list[str]], *, spec: str) -> None:
    """Fail before training starts when the first shard of a `::` source does not exist (a wrong
    path or bucket), one request per source; any other missing shard counts as `unreadable_shard`
    when it is read. `pipe:` sources are not checked."""
    for urls in sources:
        if urls[0].startswith("pipe:"):
            continue
        fs, path = fsspec.core.url_to_fs(urls[0])
        if not fs.exists(path):
            raise DataError(f"shards of data.train_shards={spec!r} do not exist: the first shard of a `::` "
                            f"source, {urls[0]}, is missing; check the path or URL")


def read_sizes(urls: list[str]) -> dict[str, int] | None:
    """Samples per shard from `sizes.json` ({name: n}) or `_info.json` ({"shardlist": [{"url", "nsamples"}]})
    next to the shards; None unless every shard is listed."""
    sizes: dict[str, int] = {}
    for directory in sorted({posixpath.dirname(u) for u in urls if not u.startswith("pipe:")}):
        sizes.update(_listed_sizes(directory))
    if not all(u in sizes for u in urls):
        return None
    return {u: sizes[u] for u in urls}


def _listed_sizes(directory: str) -> dict[str, int]:
    for name in ("sizes.json", "_info.json"):
        try:
            with fsspec.open(posixpath.join(directory, name), "r") as f:
                listed = json.load(f)
        except (OSError, ValueError):
            continue
        if name == "_info.json":
            listed = {posixpath.basename(s["url"]): s["nsamples"] for s in listed.get("shardlist", [])}
        return {posixpath.join(directory, n): int(v) for n, v in listed.items()}
    return {}


class TimedReader:
    """A file-like view of a shard read by a background thread, so that a stalled source raises
    `ShardStalled` instead of hanging the run; the thread also overlaps I/O with decoding."""

    def __init__(self, opener: Callable[[], Any], *, timeout_s: float, name: str) -> None:
        self.timeout_s, self.name = timeout_s, name
        self.chunks: queue.Queue = queue.Queue(maxsize=16)
        self.chunk, self.pos, self.eof, self.closed = b"", 0, False, False  # the chunk being read, and where
        self.failure: BaseException | None = None  # what reading the source raised, to tell it from bad data
        self.source: Any = None  # the open source, once the pump has opened it
        self.pump = threading.Thread(target=self._pump, args=(opener,), daemon=True, name=f"read {name}")
        self.pump.start()

    def _pump(self, opener: Callable[[], Any]) -> None:
        try:
            with opener() as f:
                self.source = f
                while not self.closed and (chunk := f.read(CHUNK_BYTES)):
                    self._put(chunk)
                if self.closed:
                    _stop(f)
            self._put(b"")
        except Exception as e:  # noqa: BLE001 - handed to the reading thread
            self._put(e)

    def _put(self, item: Any) -> None:
        while not self.closed:
            try:
                self.chunks.put(item, timeout=1.0)
                return
            except queue.Full:
                continue

    def _next_chunk(self) -> bool:
        """Move on to the next chunk from the source; False at its end."""
        if self.eof:
            return False
        try:
            item = self.chunks.get(timeout=self.timeout_s)
        except queue.Empty:
            self.failure = ShardStalled(f"{self.name}: no data for {self.timeout_s:g} s")
            raise self.failure from None
        if isinstance(item, Exception):
            self.failure = item
            raise item
        self.chunk, self.pos, self.eof = item, 0, item == b""
        return not self.eof

    def read(self, n: int = -1) -> bytes:
        """`n` bytes (fewer only at the end of the shard; all that is left for n < 0), copied once."""
        if 0 <= n <= len(self.chunk) - self.pos:  # the usual case: inside the current chunk
            self.pos += n
            return self.chunk[self.pos - n:self.pos]
        parts, need = [self.chunk[self.pos:]], n - (len(self.chunk) - self.pos)
        self.pos = len(self.chunk)
        while (n < 0 or need > 0) and self._next_chunk():
            take = len(self.chunk) if n < 0 else min(need, len(self.chunk))
            parts.append(self.chunk[:take])
            self.pos, need = take, need - take
        return b"".join(parts)

    def close(self) -> None:
        """Stop reading: end the reader thread, which closes the source (a stalled command is killed)."""
        self.closed = True
        if self.source is not None:
            _stop(self.source)
        while True:  # free a put that waits on a full queue
            try:
                self.chunks.get_nowait()
            except queue.Empty:
                break
        self.pump.join(JOIN_TIMEOUT_S)
        if self.pump.is_alive():  # e.g. a network read with no timeout of its own
            log.warning("%s: its reader thread is still blocked in the source after %g s", self.name, JOIN_TIMEOUT_S)


def _stop(source: Any) -> None:
    """Kill a `pipe:` source's command and all it started: closing the pipe would wait for a command
    that stalls or still writes. (While the shell is not reaped, its group id cannot be reused.)"""
    proc = getattr(source, "proc", None)
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)


def open_pipe(url: str) -> Pipe:
    """`pipe:CMD` as webdataset's gopen opens it, but in a session of its own, so that a stalled
    command can be killed together with everything it started."""
    if wds_utils.enforce_security:
        raise DataError(f"{url}: pipe: shards are refused while WDS_SECURE=1")
    return Pipe(url[5:], mode="rb", shell=True, bufsize=8192, ignore_status=[141], start_new_session=True)


def open_shard(url: str, *, timeout_s: float) -> TimedReader:
    """`pipe:CMD` (recipes only, never from data) through webdataset's Pipe; anything else via fsspec."""
    opener = (lambda: open_pipe(url)) if url.startswith("pipe:") else (lambda: fsspec.open(url, "rb").open())
    return TimedReader(opener, timeout_s=timeout_s, name=url)


def shard_samples(url: str, *, caption: str, counters: collections.Counter, retries: int,
                  backoff_s: float, timeout_s: float) -> Iterator[dict[str, Any]]:
    """Raw samples {"__key__", "image": bytes, "caption": bytes} of one shard, in tar order; its bad
    samples are counted in `counters` by reason.

    A failed or stalled read is retried, resuming after the samples (good and bad) already handled,
    so that each is yielded or counted once; after `retries` the shard counts as `unreadable_shard`.
    A shard that does not exist counts at once (retrying cannot help). Corrupt or cut tar bytes
    end the shard (`truncated_shard`).
    """
    handled = 0  # samples, good or bad, already yielded or counted
    for attempt in range(retries + 1):
        reader = open_shard(url, timeout_s=timeout_s)
        try:
            for i, sample in enumerate(group_samples(reader, caption=caption)):
                if i < handled:
                    continue
                handled += 1
                if isinstance(sample, BadSample):
                    counters[sample.reason] += 1
                else:
                    yield sample
            return
        except (*BAD_BYTES, OSError) as e:
            if e is not reader.failure:  # the bytes are bad, not the source
                counters["truncated_shard"] += 1
                log.warning("skipping the rest of %s: %s", url, e)
                return
            if isinstance(e, FileNotFoundError) or attempt == retries:
                counters["unreadable_shard"] += 1
                log.warning("skipping %s after %d attempts: %s", url, attempt + 1, e)
                return
            log.warning("retrying %s in %.1f s: %s", url, backoff_s * 2**attempt, e)
            time.sleep(backoff_s * 2**attempt)
        finally:
            reader.close()


class _CheckedInfo(tarfile.TarInfo):
    """`tarfile`'s member header with clipscale's limits. A size over the cap raises before any of
    it is read (`tarfile` would read a long name or pax header of any claimed size, and skip a
    member by reading all it claims); a bad header, or a stream that ends before the end-of-archive
    block, raises instead of ending the archive silently as `tarfile` does past the first member."""

    @classmethod
    def frombuf(cls, buf: bytes, encoding: str, errors: str) -> tarfile.TarInfo:
        info = super().frombuf(buf, encoding, errors)
        _check_size(info, MAX_META_BYTES if info.type in META_TYPES else MAX_MEMBER_BYTES)
        return info

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            info = super().fromtarfile(tar)
        except tarfile.EOFHeaderError:  # the end-of-archive block: the normal end
            raise
        except tarfile.HeaderError as e:  # a cut or corrupt header (an empty one: no end-of-archive block)
            raise tarfile.ReadError(f"bad tar header at byte {tar.offset}: {e}") from None
        _check_size(info, MAX_MEMBER_BYTES)  # again: pax records and sparse maps set sizes too
        return info


def _check_size(info: tarfile.TarInfo, limit: int) -> None:
    if not 0 <= info.size <= limit:
        raise tarfile.ReadError(f"tar member {info.name!r} claims {info.size} bytes, outside 0..{limit}: "
                                f"a corrupt header")


def tar_members(stream: BinaryIO, select: Callable[[str], bool] = lambda name: True,
                ) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of the selected regular files of a tar stream, in archive order, read by `tarfile`.

    Other members (unselected, links, directories, devices, sparse files, webdataset's `__meta__`)
    are skipped unread. Raises `tarfile.ReadError` (or another of `BAD_BYTES`) for a corrupt or cut
    stream or a size over the caps; never writes anything.
    """
    with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_CheckedInfo) as tar:
        while (info := tar.next()) is not None:
            tar.members = []  # a stream's members are never revisited: keep memory flat (as webdataset does)
            if info.type in FILE_TYPES and select(info.name) and not META_NAME.match(info.name):
                yield info.name, tar.extractfile(info).read()


def extension(name: str) -> str:
    """A member's last extension, lower case: what decides whether it is an image or a caption."""
    return name.rsplit(".", 1)[-1].lower()


def group_samples(stream: BinaryIO, *, caption: str) -> Iterator[dict[str, Any] | BadSample]:
    """A tar stream's image and caption members grouped by key, in order: each group is a sample, or a
    `BadSample` when it is incomplete, duplicate or unsafe."""
    caption_ext = "json" if caption.startswith("json:") else caption
    wanted = set(IMAGE_EXTENSIONS) | {caption_ext}
    seen: set[str] = set()
    current: dict[str, Any] = {}
    for name, data in tar_members(stream, select=lambda name: extension(name) in wanted):
        key, _ = base_plus_ext(name)
        if key is None:
            continue
        if current and current["__key__"] != key:
            yield complete_sample(current, seen=seen)
            current = {}
        current["__key__"] = key
        field = "caption" if extension(name) == caption_ext else "image"
        current[f"_{field}_count"] = current.get(f"_{field}_count", 0) + 1
        current[field] = data
    if current:
        yield complete_sample(current, seen=seen)


def complete_sample(sample: dict[str, Any], *, seen: set[str]) -> dict[str, Any] | BadSample:
    """The sample of one key's members, or why it cannot be used; records the key in `seen`."""
    key = sample["__key__"]
    reason = None
    if key.startswith("/") or ".." in key.split("/"):
        reason = "unsafe_member_name"
    elif key in seen or sample.get("_image_count", 0) > 1 or sample.get("_caption_count", 0) > 1:
        reason = "duplicate_key"
    elif "image" not in sample:
        reason = "missing_image"
    elif "caption" not in sample:
        reason = "missing_caption"
    seen.add(key)
    if reason:
        return BadSample(reason, key)
    return {"__key__": key, "image": sample["image"], "caption": sample["caption"]}


def caption_text(data: bytes, *, caption: str) -> str:
    """The caption of a sample from its `.txt` bytes or a field of its `.json`; BadSample if unusable."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadSample("caption_not_utf8") from None
    if caption.startswith("json:"):
        try:
            text = json.loads(text)[caption[5:]]
        except (ValueError, KeyError, TypeError):
            raise BadSample("missing_caption", f"no field {caption[5:]!r} in the json") from None
        if not isinstance(text, str):
            raise BadSample("missing_caption", f"field {caption[5:]!r} is not a string")
    if not text.strip():
        raise BadSample("empty_caption")
    return text
