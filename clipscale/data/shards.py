"""Shard specs: expansion, existence checks and sizes."""
from __future__ import annotations

import json
import posixpath

import fsspec
from webdataset.shardlists import expand_urls


class DataError(ValueError):
    """Shards cannot be used as configured; the message names the spec or file."""


class BadSample(Exception):
    """One sample cannot be used; it is skipped and counted under `reason` (a short snake_case name)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def expand_shards(spec: str) -> list[str]:
    """`a/{000..009}.tar::b/x.tar` -> the list of shard URLs (brace expansion, `::` joins)."""
    urls = expand_urls(spec)
    if not urls:
        raise DataError(f"data.train_shards={spec!r} expands to no shard")
    return urls


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
    """Sample counts per shard from `sizes.json` next to the shards, if every shard is listed."""
    sizes: dict[str, int] = {}
    for directory in sorted({posixpath.dirname(u) for u in urls}):
        try:
            with fsspec.open(posixpath.join(directory, "sizes.json"), "r") as f:
                listed = json.load(f)
        except (FileNotFoundError, OSError, json.JSONDecodeError):
            return None
        sizes.update({posixpath.join(directory, name): int(n) for name, n in listed.items()})
    if not all(u in sizes for u in urls):
        return None
    return {u: sizes[u] for u in urls}
