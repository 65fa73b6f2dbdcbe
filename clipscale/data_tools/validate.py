"""`validate`: decode every sample of some shards exactly as the loader would, and count the bad ones.

Each shard is read by the loader's reader (which counts `missing_caption`, `duplicate_key`,
`unsafe_member_name`, `truncated_shard`, `unreadable_shard`, ...) and each sample's caption and
image go through the loader's `caption_text` and `decode_crop` (`empty_image`, `not_an_image`,
`corrupt_image`, `decompression_bomb`, `empty_caption`, `caption_not_utf8`), shards in parallel.
The input is only read. `fix` writes the good samples (image + caption) to a new directory with
the same shard names and a `sizes.json`.
"""
from __future__ import annotations

import collections
import functools
import logging
import os
import posixpath
import random
from typing import Any

from clipscale.data.decode import decode_crop
from clipscale.data.shards import BadSample, DataError, caption_text
from clipscale.data_tools.shardio import (ShardWriter, caption_extension, image_extension, parallel_map, read_shard,
                                remove_temporary, write_json)

log = logging.getLogger(__name__)
CHECK_SIZE = 32  # output side: all the image data is still read (large JPEGs at reduced DCT scale)


def check_sample(sample: dict[str, Any], *, caption: str) -> None:
    """Raise BadSample with the loader's reason if training would skip this sample."""
    caption_text(sample["caption"], caption=caption)
    decode_crop(sample["image"], size=CHECK_SIZE, rng=random.Random(0), scale=(1.0, 1.0))


def validate_shard(url: str, *, caption: str, fix_dir: str | None) -> dict[str, Any]:
    """{"url", "samples": good ones, "counters": bad ones by reason, "bad": [[key, reason], ...]}."""
    counters: collections.Counter = collections.Counter()
    bad: list[list[str]] = []
    good = 0
    writer = ShardWriter(posixpath.join(fix_dir, posixpath.basename(url))) if fix_dir else None
    try:
        for sample in read_shard(url, caption=caption, counters=counters):
            try:
                check_sample(sample, caption=caption)
            except BadSample as e:
                counters[e.reason] += 1
                bad.append([sample["__key__"], e.reason])
                continue
            good += 1
            if writer is not None:
                writer.write(sample["__key__"], {image_extension(sample["image"]): sample["image"],
                                                 caption_extension(caption): sample["caption"]})
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.commit()
    return {"url": url, "samples": good, "counters": dict(counters), "bad": bad}


def validate_shards(urls: list[str], *, caption: str = "txt", fix_dir: str | None = None,
                    processes: int = 1) -> dict[str, Any]:
    """Validate every shard; returns {"samples", "bad": {reason: n}, "shards": [per-shard results]}."""
    if fix_dir is not None:
        inputs = {_place(posixpath.dirname(u)) for u in urls}
        if _place(fix_dir) in inputs:
            raise DataError(f"--fix {fix_dir} is where the input shards are; validate never modifies its "
                            "input: choose another directory")
        names = collections.Counter(posixpath.basename(u) for u in urls)
        if max(names.values()) > 1:
            raise DataError(f"--fix cannot write shards from several directories sharing the name "
                            f"{names.most_common(1)[0][0]!r} into one; validate them separately")
        remove_temporary(fix_dir)
    check = functools.partial(validate_shard, caption=caption, fix_dir=fix_dir)
    shards = list(parallel_map(check, urls, processes=processes, desc="validate", total=len(urls), unit="shard"))
    bad = sum((collections.Counter(s["counters"]) for s in shards), collections.Counter())
    report = {"samples": sum(s["samples"] for s in shards), "bad": dict(bad), "shards": shards}
    if fix_dir is not None:
        write_json(posixpath.join(fix_dir, "sizes.json"),
                   {posixpath.basename(s["url"]): s["samples"] for s in shards})
    return report


def _place(directory: str) -> str:
    """A directory compared by where it is: local paths resolved, URLs without a trailing slash."""
    return directory.rstrip("/") if "://" in directory else os.path.realpath(directory or ".")


def summary_table(report: dict[str, Any]) -> str:
    """The report as a small text table: good samples, then each bad reason."""
    rows = [("samples (good)", report["samples"])] + sorted(report["bad"].items())
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {n:>10,}" for name, n in rows)
