"""`sizes`: write the `sizes.json` the loader reads for exact epochs.

A shard's size comes from img2dataset's `NNNNN_stats.json` next to it (`successes`: the samples
written into the tar) when present, else from counting its complete samples with the loader's own
reader, shards in parallel. Entries of an existing `sizes.json` for other shards are kept.
"""
from __future__ import annotations

import collections
import functools
import logging
import posixpath

from clipscale.data_tools.shardio import parallel_map, read_json, read_shard, write_json

log = logging.getLogger(__name__)


def stats_path(url: str) -> str:
    """img2dataset's per-shard stats file: `00012.tar` -> `00012_stats.json`."""
    return url[: -len(".tar")] + "_stats.json"


def shard_size(url: str, *, caption: str, count: bool) -> int:
    """Samples in one shard: its stats file's `successes` unless `count`, else counted."""
    if not count:
        stats = read_json(stats_path(url))
        if isinstance(stats, dict) and isinstance(stats.get("successes"), int):
            return stats["successes"]
    counters: collections.Counter = collections.Counter()
    return sum(1 for _ in read_shard(url, caption=caption, counters=counters))


def write_sizes(urls: list[str], *, caption: str = "txt", count: bool = False, processes: int = 1) -> dict[str, int]:
    """Write `sizes.json` into every directory holding some of `urls`; returns {url: samples}."""
    measure = functools.partial(shard_size, caption=caption, count=count)
    sizes = dict(zip(urls, parallel_map(measure, urls, processes=processes, desc="sizes", total=len(urls),
                                        unit="shard")))
    by_directory: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for url, n in sizes.items():
        by_directory[posixpath.dirname(url)][posixpath.basename(url)] = n
    for directory, listed in by_directory.items():
        path = posixpath.join(directory, "sizes.json")
        write_json(path, {**(read_json(path) or {}), **listed})
        log.info("wrote %s (%d shards, %d samples)", path, len(listed), sum(listed.values()))
    return sizes
