"""`make`: WebDataset shards from an image folder and its captions.

Inputs are listed in a fixed order (the captions table's rows, or the sorted image paths), and
input i becomes sample `{i:09d}` (`.jpg|.png|.webp` image, `.txt` caption, `.json` with its
source path and size), so keys are unique and stable across runs. Images are checked (fully
decoded) and optionally resized / re-encoded in parallel; shards are cut in input order at a
sample count or a size in MB and written atomically, each followed by `NNNNNN_stats.json`
(img2dataset's format: `successes`, plus the input range, failures by reason and the skipped inputs).

Resume: `OUT/make.json` records the parameters and a digest of the input list; a run with the
same ones keeps every shard whose stats file exists and continues with the next input, so an
interrupted run finishes without duplicates. `OUT/sizes.json` is written last.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import json
import logging
import posixpath
from typing import Any

import fsspec

from clipscale.data.shards import BadSample, DataError
from clipscale.data_tools.inputs import encode_image, read_bytes, sidecar_pairs, table_pairs
from clipscale.data_tools.shardio import ShardWriter, parallel_map, read_json, remove_temporary, write_json

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardTarget:
    """Where shards are cut and how images are stored."""

    samples_per_shard: int = 10_000
    """Most samples in one shard."""
    shard_mb: float | None = None
    """Most megabytes (10^6 bytes) in one shard, if set; a shard holds at least one sample."""
    max_side: int | None = None
    """Resize images whose longer side is larger to this many pixels (aspect kept)."""
    quality: int | None = None
    """Re-encode every image as JPEG at this quality (1-95); by default bytes are kept as they are."""

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1 or (self.shard_mb is not None and self.shard_mb <= 0):
            raise DataError(f"samples_per_shard={self.samples_per_shard} and shard_mb={self.shard_mb} must be "
                            "positive; pass --samples-per-shard N and/or --shard-mb MB above 0")
        if self.quality is not None and not 1 <= self.quality <= 95:
            raise DataError(f"quality={self.quality} must be in 1..95 (JPEG quality)")
        if self.max_side is not None and self.max_side < 1:
            raise DataError(f"max_side={self.max_side} must be a positive number of pixels")


def encode_input(job: tuple[int, str, str | None], *, max_side: int | None, quality: int | None) -> dict[str, Any]:
    """One input (index, image URL, caption) -> the sample's members, or the reason it is skipped."""
    index, url, caption = job
    if caption is None:
        return {"index": index, "reason": "missing_caption"}
    if not caption.strip():
        return {"index": index, "reason": "empty_caption"}
    try:
        ext, image, size = encode_image(read_bytes(url), max_side=max_side, quality=quality)
    except BadSample as e:
        return {"index": index, "reason": e.reason}
    return {"index": index, "ext": ext, "image": image, "caption": caption.strip().encode(), "size": size}


def shard_name(i: int) -> str:
    return f"{i:06d}.tar"


def stats_name(i: int) -> str:
    return f"{i:06d}_stats.json"


def make_shards(folder: str, out: str, *, target: ShardTarget, captions: str | None = None,
                path_column: str = "path", caption_column: str = "caption", processes: int = 1) -> dict[str, Any]:
    """Write shards of `folder`'s images into `out`; returns {"shards", "samples", "failed": {reason: n},
    "skipped": [[input path, reason], ...]}."""
    folder = folder.rstrip("/")
    pairs = (table_pairs(folder, captions, path_column=path_column, caption_column=caption_column)
             if captions else sidecar_pairs(folder))
    # the input list is part of the parameters: resuming over a changed list would shift the indices
    inputs_sha1 = hashlib.sha1(json.dumps(pairs).encode()).hexdigest()
    params = {"folder": folder, "captions": captions, "path_column": path_column, "caption_column": caption_column,
              "inputs": len(pairs), "inputs_sha1": inputs_sha1, **dataclasses.asdict(target)}
    check_resumable(out, params)
    shard, start = completed_shards(out)
    if start:
        log.info("resuming %s at shard %d, input %d of %d", out, shard, start, len(pairs))
    jobs = [(i, url, caption) for i, (url, caption) in enumerate(pairs) if i >= start]
    encode = functools.partial(encode_input, max_side=target.max_side, quality=target.quality)
    writer, first, failed, skipped = None, start, collections.Counter(), []
    try:
        for result in parallel_map(encode, jobs, processes=processes, desc="make", total=len(jobs), unit="image"):
            if "reason" in result:
                failed[result["reason"]] += 1
                skipped.append([relative(pairs[result["index"]][0], folder), result["reason"]])
                continue
            if writer is not None and is_full(writer, target, len(result["image"]) + len(result["caption"])):
                close_shard(writer, out, shard, first=first, end=result["index"], failed=failed, skipped=skipped)
                writer, first, shard, failed, skipped = None, result["index"], shard + 1, collections.Counter(), []
            writer = writer or ShardWriter(posixpath.join(out, shard_name(shard)))
            meta = {"source": relative(pairs[result["index"]][0], folder),
                    "width": result["size"][0], "height": result["size"][1]}
            writer.write(f"{result['index']:09d}", {result["ext"]: result["image"], "txt": result["caption"],
                                                    "json": json.dumps(meta).encode()})
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        close_shard(writer, out, shard, first=first, end=len(pairs), failed=failed, skipped=skipped)
        shard += 1
    return finish(out, shards=shard)


def relative(source: str, folder: str) -> str:
    """An input's path as the user knows it: relative to the image folder when inside it."""
    return posixpath.relpath(source, folder) if source.startswith(folder + "/") else source


def check_resumable(out: str, params: dict[str, Any]) -> None:
    """`out` must be new, empty, or an earlier `make` with the same parameters (then it resumes)."""
    fs, root = fsspec.core.url_to_fs(out)
    previous = read_json(posixpath.join(out, "make.json"))
    if previous is None and fs.exists(root) and fs.ls(root):
        raise DataError(f"output directory {out} is not empty and holds no make.json; choose a new directory")
    if previous is not None and previous != params:
        changed = sorted(k for k in params.keys() | previous.keys() if params.get(k) != previous.get(k))
        raise DataError(f"{out} was made with other parameters ({', '.join(changed)} differ: "
                        f"{ {k: previous.get(k) for k in changed} }); use a new output directory to change them")
    write_json(posixpath.join(out, "make.json"), params)
    remove_temporary(out)


def completed_shards(out: str) -> tuple[int, int]:
    """(number of complete shards at the start of `out`, the first input index not in them)."""
    fs, root = fsspec.core.url_to_fs(out)
    shard, start = 0, 0
    while fs.exists(posixpath.join(root, shard_name(shard))) and (
            stats := read_json(posixpath.join(out, stats_name(shard)))) is not None:
        shard, start = shard + 1, stats["end_index"]
    return shard, start


def is_full(writer: ShardWriter, target: ShardTarget, incoming_bytes: int) -> bool:
    if writer.samples >= target.samples_per_shard:
        return True
    return target.shard_mb is not None and writer.bytes + incoming_bytes > target.shard_mb * 1e6


def close_shard(writer: ShardWriter, out: str, shard: int, *, first: int, end: int,
                failed: collections.Counter, skipped: list[list[str]]) -> None:
    """Commit the shard, then its stats file: a shard counts as complete once both exist."""
    writer.commit()
    write_json(posixpath.join(out, stats_name(shard)), {
        "count": end - first, "successes": writer.samples, "failed": dict(failed), "skipped": skipped,
        "first_index": first, "end_index": end, "bytes": writer.bytes})


def finish(out: str, *, shards: int) -> dict[str, Any]:
    """Remove shards past the last one written (left by an earlier run), write sizes.json, summarise."""
    fs, root = fsspec.core.url_to_fs(out)
    for path in fs.glob(posixpath.join(root, "[0-9]" * 6 + ".tar")) + fs.glob(posixpath.join(root, "*_stats.json")):
        if int(posixpath.basename(path)[:6]) >= shards:
            fs.rm(path)
    stats = [read_json(posixpath.join(out, stats_name(i))) for i in range(shards)]
    write_json(posixpath.join(out, "sizes.json"), {shard_name(i): s["successes"] for i, s in enumerate(stats)})
    failed = sum((collections.Counter(s["failed"]) for s in stats), collections.Counter())
    summary = {"shards": shards, "samples": sum(s["successes"] for s in stats), "failed": dict(failed),
               "skipped": [entry for s in stats for entry in s.get("skipped", [])]}
    log.info("wrote %s: %d shards, %d samples, skipped %s", out, summary["shards"], summary["samples"],
             dict(failed) or "none")
    return summary
