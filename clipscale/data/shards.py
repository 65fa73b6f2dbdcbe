"""Shards: spec expansion, sizes, and reading one shard's raw samples safely.

Reading never decodes pickles and never writes files: members are selected by extension and
kept as bytes. A source that fails or stalls is retried with backoff, resuming after the samples
already delivered, and finally skipped; a truncated or corrupt tar ends its shard early.
"""
from __future__ import annotations

import collections
import json
import logging
import posixpath
import queue
import tarfile
import threading
import time
from typing import Any, Callable, Iterator

import fsspec
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext, tar_file_iterator

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CHUNK_BYTES = 1 << 20


class DataError(ValueError):
    """Shards cannot be used as configured; the message names the spec or file."""


class BadSample(Exception):
    """One sample cannot be used; it is skipped and counted under `reason` (a short snake_case name)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class ShardStalled(OSError):
    """A shard delivered no bytes within `read_timeout_s`."""


def expand_sources(spec: str) -> list[list[str]]:
    """`a/{000..009}.tar::b/x.tar` -> shard URLs per `::`-separated source (brace-expanded)."""
    sources = [expand_urls(part) for part in spec.split("::")]
    if not all(sources):
        raise DataError(f"data.train_shards={spec!r}: a `::` source expands to no shard")
    return sources


def shard_weights(sources: list[list[str]], weights: tuple[float, ...] | None, *, spec: str) -> list[float]:
    """Sampling weight of every shard: its source's weight (one per `::` source)."""
    weights = weights or (1.0,) * len(sources)
    if len(weights) != len(sources) or min(weights) < 0 or max(weights) <= 0:
        raise DataError(f"data.train_weights={list(weights)} must give one non-negative weight per "
                        f"`::` source of data.train_shards={spec!r} ({len(sources)} sources), not all zero")
    return [w for source, w in zip(sources, weights) for _ in source]


def check_shards_exist(urls: list[str], *, spec: str) -> None:
    """Fail before training starts when local or fsspec shards are missing (pipe: is not checked)."""
    missing = []
    for url in urls:
        if url.startswith("pipe:"):
            continue
        fs, path = fsspec.core.url_to_fs(url)
        if not fs.exists(path):
            missing.append(url)
    if missing:
        raise DataError(
            f"{len(missing)} of {len(urls)} shards of data.train_shards={spec!r} do not exist, "
            f"e.g. {missing[0]}"
        )


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
        self.buffer, self.pos, self.eof, self.closed = bytearray(), 0, False, False
        self.head, self.tail, self.total = b"", b"", 0  # to check the end-of-archive marker
        threading.Thread(target=self._pump, args=(opener,), daemon=True).start()

    def _pump(self, opener: Callable[[], Any]) -> None:
        try:
            with opener() as f:
                while not self.closed and (chunk := f.read(CHUNK_BYTES)):
                    self._put(chunk)
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

    def read(self, n: int = -1) -> bytes:
        while not self.eof and (n < 0 or len(self.buffer) - self.pos < n):
            try:
                item = self.chunks.get(timeout=self.timeout_s)
            except queue.Empty:
                raise ShardStalled(f"{self.name}: no data for {self.timeout_s:g} s") from None
            if isinstance(item, Exception):
                raise item
            self.eof = item == b""
            self.buffer += item
        end = len(self.buffer) if n < 0 else min(self.pos + n, len(self.buffer))
        out, self.pos = bytes(self.buffer[self.pos:end]), end
        if self.pos >= CHUNK_BYTES:  # drop consumed bytes once per chunk, not per (small) tar read
            del self.buffer[:self.pos]
            self.pos = 0
        self.head = self.head or out[:2]
        self.tail, self.total = (self.tail + out[-1024:])[-1024:], self.total + len(out)
        return out

    def ended_cleanly(self) -> bool:
        """Whether an uncompressed tar ended with its end-of-archive marker (two zero blocks).

        tarfile treats a header cut short as the end of the archive, so without this check a
        truncated shard would look complete."""
        self.read()
        return self.head == b"\x1f\x8b" or (self.total % 512 == 0 and self.tail == bytes(1024))

    def close(self) -> None:
        self.closed = True


def open_shard(url: str, *, timeout_s: float) -> TimedReader:
    """`pipe:CMD` (recipes only, never from data) through webdataset's gopen; anything else via fsspec."""
    opener = (lambda: gopen(url, "rb")) if url.startswith("pipe:") else (lambda: fsspec.open(url, "rb").open())
    return TimedReader(opener, timeout_s=timeout_s, name=url)


def shard_samples(url: str, *, caption: str, counters: collections.Counter, retries: int,
                  backoff_s: float, timeout_s: float) -> Iterator[dict[str, Any]]:
    """Raw samples {"__key__", "image": bytes, "caption": bytes} of one shard, in tar order.

    Failed or stalled reads are retried, skipping the samples already yielded; after `retries`
    the shard is counted as `unreadable_shard` and skipped. Tar errors end it (`truncated_shard`).
    """
    delivered = 0
    for attempt in range(retries + 1):
        reader = open_shard(url, timeout_s=timeout_s)
        try:
            for i, sample in enumerate(group_samples(reader, caption=caption, counters=counters)):
                if i >= delivered:
                    delivered += 1
                    yield sample
            if not reader.ended_cleanly():
                raise tarfile.ReadError("no end-of-archive marker: the shard is truncated")
            return
        except tarfile.TarError as e:
            counters["truncated_shard"] += 1
            log.warning("skipping the rest of %s: %s", url, e)
            return
        except OSError as e:
            if attempt == retries:
                counters["unreadable_shard"] += 1
                log.warning("skipping %s after %d attempts: %s", url, retries + 1, e)
                return
            log.warning("retrying %s in %.1f s: %s", url, backoff_s * 2**attempt, e)
            time.sleep(backoff_s * 2**attempt)
        finally:
            reader.close()


def group_samples(fileobj: Any, *, caption: str, counters: collections.Counter) -> Iterator[dict[str, Any]]:
    """Group a tar stream's members into samples by key; incomplete, duplicate or unsafe ones are counted."""
    caption_ext = "json" if caption.startswith("json:") else caption
    wanted = set(IMAGE_EXTENSIONS) | {caption_ext}
    seen: set[str] = set()
    current: dict[str, Any] = {}

    def select(name: str) -> bool:
        return name.rsplit(".", 1)[-1].lower() in wanted

    for member in tar_file_iterator(fileobj, select_files=select):
        key, ext = base_plus_ext(member["fname"])
        if key is None:
            continue
        if current and current["__key__"] != key:
            yield from complete_sample(current, caption=caption, counters=counters, seen=seen)
            current = {}
        current["__key__"] = key
        field = "caption" if ext.rsplit(".", 1)[-1].lower() == caption_ext else "image"
        current[f"_{field}_count"] = current.get(f"_{field}_count", 0) + 1
        current[field] = member["data"]
    if current:
        yield from complete_sample(current, caption=caption, counters=counters, seen=seen)


def complete_sample(sample: dict[str, Any], *, caption: str, counters: collections.Counter,
                    seen: set[str]) -> Iterator[dict[str, Any]]:
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
        counters[reason] += 1
        return
    yield {"__key__": key, "image": sample["image"], "caption": sample["caption"]}


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
