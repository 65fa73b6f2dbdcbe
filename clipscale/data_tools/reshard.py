"""`reshard`: N shards -> M balanced shards with a global shuffle, in memory bounded by `bucket_mb`.

Rao's two-pass shuffle (random buckets, then a shuffle inside each bucket, gives a uniformly random
order), with buckets cut to a size bound, and exact deduplication on disk:

1. Fill: read the inputs once, in order, with the loader's reader; send each sample to the train or
   val split by a hash of its key and append it to one of MAX_OPEN random buckets of its split
   (`OUT/.reshard/buckets/`); write a record (hash, input index, bucket, position) of its key and
   of its image to hash-partitioned files (`clipscale.data_tools.dedup`).
2. Settle: deduplicate one record partition at a time (the first occurrence of a key, and of an
   image, is kept; a sample is dropped if it is a later occurrence of either), writing each
   bucket's dropped positions beside it; then split every bucket over `bucket_mb` into random
   sub-buckets (recursively, MAX_OPEN open at once), dropping those positions on the way. A random
   split of a random bucket is still a random bucket, so the shuffle stays uniform, and the number
   of buckets follows N: about N x sample bytes / `bucket_mb`.
3. Write: cut the concatenation of the shuffled buckets into shards of equal size (+-1), shards in
   parallel, each reading (and shuffling in memory) the buckets its slice overlaps, one at a time.

Memory per process: one bucket (at most `bucket_mb`, counting SAMPLE_OVERHEAD per sample) in step 3; in step 2 one record
partition (at most `bucket_mb`) and the dropped positions of one step-1 bucket (4 bytes per duplicate
in it: N / MAX_OPEN samples, ~10 MB at 2 x 10^9 samples with 30% duplicates); in step 1 the open
files' buffers (MAX_OPEN buckets per split and 2 x 64 record files: ~2 MB on a local disk, more where
`OUT` is an object store whose writers buffer blocks of several MB). Only the dropped positions grow
with N, slowly.

Resume: step 1 ends by writing `.reshard/filled.json`, step 2 `.reshard/buckets.json`; an interrupted
step starts over from the last of them. Step 3 is deterministic given the buckets, so shards already
under their final names are skipped. `OUT/reshard.json` (parameters and counts) marks a finished
run, and `.reshard/` is removed.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import logging
import math
import posixpath
import random
import struct
from typing import Any, Iterator

import fsspec
import numpy as np
from tqdm import tqdm

from clipscale.data.shards import DataError
from clipscale.data_tools.dedup import RecordWriter, digest, later_occurrences
from clipscale.data_tools.shardio import (ShardWriter, TempFile, caption_extension, image_extension, member_key,
                                          parallel_map, read_json, read_shard, remove_temporary, write_json)

log = logging.getLogger(__name__)
MAX_OPEN = 128  # buckets of one split open at once (in step 1, and when splitting one bucket)
BUCKET_MB = 256.0
FRAME = struct.Struct("<III")  # a bucket sample's key, image and caption lengths
SAMPLE_OVERHEAD = 512  # bytes of Python objects per sample held in memory (dict, bytes, str), counted in a bucket
SPLIT_MARGIN = 1.25  # sub-buckets per bound: random sizes rarely pass the bound (then split again)


def val_split(key: str, val_fraction: float) -> bool:
    """Whether a key belongs to the val split: a hash of the key, so the split is stable across runs."""
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") < val_fraction * 2**64


def split_shards(shards: int, val_fraction: float) -> dict[str, int]:
    """Output shards per split: all to the top level without a val split, else train + val (>= 1 each)."""
    if not val_fraction:
        return {"": shards}
    val = max(1, round(shards * val_fraction))
    return {"train": max(1, shards - val), "val": val}


def reshard(urls: list[str], out: str, *, shards: int, val_fraction: float = 0.0, seed: int = 0,
            caption: str = "txt", drop_duplicate_images: bool = True, bucket_mb: float = BUCKET_MB,
            processes: int = 1) -> dict[str, Any]:
    """Reshard `urls` into `out`; returns {"splits": {split: [samples per shard]}, "dropped": {reason: n}}.
    Keep `drop_duplicate_images` off for sets that pair one image with several captions (COCO-style)."""
    if shards < 1 or not 0 <= val_fraction < 1 or not bucket_mb > 0:
        raise DataError(f"shards={shards} must be >= 1, val_fraction={val_fraction} in [0, 1) and "
                        f"bucket_mb={bucket_mb} above 0")
    params = {"inputs": urls, "shards": shards, "val_fraction": val_fraction, "seed": seed, "caption": caption,
              "drop_duplicate_images": drop_duplicate_images, "bucket_mb": bucket_mb}
    fs, root = fsspec.core.url_to_fs(out)
    done = read_json(posixpath.join(out, "reshard.json"))
    if done is not None and done["params"] == params:
        log.info("%s is already resharded with these parameters", out)
        return done["result"]
    tmp = posixpath.join(out, ".reshard")
    filled, buckets = (read_json(posixpath.join(tmp, name)) for name in ("filled.json", "buckets.json"))
    if any(marker is not None and marker["params"] != params for marker in (filled, buckets)):
        raise DataError(f"{out} holds an interrupted reshard with other parameters; delete {tmp} or use a new "
                        "output directory")
    if filled is None:
        if fs.exists(root) and [p for p in fs.ls(root, detail=False) if posixpath.basename(p) != ".reshard"]:
            raise DataError(f"output directory {out} is not empty; reshard writes into a new or empty directory")
        if fs.exists(posixpath.join(root, ".reshard")):
            fs.rm(posixpath.join(root, ".reshard"), recursive=True)
        filled = {"params": params, **fill_buckets(urls, tmp, params)}
        write_json(posixpath.join(tmp, "filled.json"), filled)
    if buckets is None:
        buckets = {"params": params, **settle(tmp, filled, processes=processes)}
        write_json(posixpath.join(tmp, "buckets.json"), buckets)
    splits = {split: write_split(posixpath.join(out, split) if split else out, split=split, leaves=leaves,
                                 shards=split_shards(shards, val_fraction)[split], params=params, processes=processes)
              for split, leaves in buckets["leaves"].items()}
    result = {"splits": splits, "dropped": buckets["dropped"]}
    write_json(posixpath.join(out, "reshard.json"), {"params": params, "result": result})
    fs.rm(posixpath.join(root, ".reshard"), recursive=True)
    log.info("resharded %d samples into %s (dropped %s)", sum(map(sum, splits.values())), out,
             buckets["dropped"] or "none")
    return result


def bound_bytes(params: dict[str, Any]) -> int:
    return int(params["bucket_mb"] * 1e6)


class BucketWriter(TempFile):
    """A bucket: samples framed as (3 x uint32 lengths, key, image, caption), appended in order.

    Buckets are this run's private scratch, so they skip tar's 512-byte headers and its parser.
    `bytes` counts what the samples take in memory once read (their bytes + SAMPLE_OVERHEAD each),
    the size the bound applies to. Committed by renaming a temporary file, like a shard.
    """

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.url = path
        self.samples, self.bytes = 0, 0

    def write(self, sample: dict[str, Any]) -> None:
        key = sample["__key__"].encode()
        self.file.write(FRAME.pack(len(key), len(sample["image"]), len(sample["caption"])))
        self.file.write(key + sample["image"] + sample["caption"])
        self.samples += 1
        self.bytes += len(key) + len(sample["image"]) + len(sample["caption"]) + SAMPLE_OVERHEAD


def bucket_samples(path: str) -> Iterator[dict[str, Any]]:
    """The samples of a bucket, in order."""
    with fsspec.open(path, "rb") as f:
        while head := f.read(FRAME.size):
            lengths = FRAME.unpack(head)
            data = f.read(sum(lengths))
            if len(data) != sum(lengths):
                raise DataError(f"bucket {path} is cut short; delete its .reshard directory and run again")
            key, image = data[:lengths[0]], data[lengths[0]:lengths[0] + lengths[1]]
            yield {"__key__": key.decode(), "image": image, "caption": data[lengths[0] + lengths[1]:]}


def fill_buckets(urls: list[str], tmp: str, params: dict[str, Any]) -> dict[str, Any]:
    """Step 1: every sample with a safe key into a random bucket of its split, and its dedup records."""
    splits = list(split_shards(params["shards"], params["val_fraction"]))
    writers: dict[int, BucketWriter] = {}
    records = {kind: RecordWriter(posixpath.join(tmp, "records", kind))
               for kind in ("keys", "images")[:1 + params["drop_duplicate_images"]]}
    rng = random.Random(f"reshard/{params['seed']}")
    counters: collections.Counter = collections.Counter()
    samples = (s for url in urls for s in read_shard(url, caption=params["caption"], counters=counters))
    index = 0
    try:
        for sample in tqdm(samples, desc="reshard: bucketing", unit="sample", disable=None):
            key = member_key(sample["__key__"])
            if key is None:
                counters["unsafe_member_name"] += 1
                continue
            split = ("val" if val_split(key, params["val_fraction"]) else "train") if params["val_fraction"] else ""
            bucket = splits.index(split) * MAX_OPEN + rng.randrange(MAX_OPEN)
            if bucket not in writers:
                writers[bucket] = BucketWriter(posixpath.join(tmp, "buckets", f"{split or 'all'}-{bucket:06d}"))
            pos = writers[bucket].samples
            records["keys"].add(digest(key.encode()), index=index, bucket=bucket, pos=pos)
            if "images" in records:
                records["images"].add(digest(sample["image"]), index=index, bucket=bucket, pos=pos)
            writers[bucket].write({**sample, "__key__": key})
            index += 1
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    for w in writers.values():
        w.commit()
    return {"buckets": [{"id": b, "split": splits[b // MAX_OPEN], "path": w.url, "samples": w.samples,
                         "bytes": w.bytes}
                        for b, w in sorted(writers.items())],
            "records": {kind: w.close() for kind, w in records.items()}, "dropped": dict(counters)}


def settle(tmp: str, filled: dict[str, Any], *, processes: int) -> dict[str, Any]:
    """Step 2: duplicates found partition by partition, then buckets over the bound split, duplicates dropped."""
    params = filled["params"]
    work = posixpath.join(tmp, "work")
    fs, local = fsspec.core.url_to_fs(work)
    if fs.exists(local):
        fs.rm(local, recursive=True)  # an interrupted settle starts over
    for kind, paths in filled["records"].items():
        files: dict[int, Any] = {}

        def emit(records: np.ndarray, kind: str = kind) -> None:
            for b in np.unique(records["bucket"]):
                if b not in files:
                    files[b] = fsspec.open(drops_path(work, kind, int(b)), "wb").open()
                files[b].write(records["pos"][records["bucket"] == b].tobytes())

        later_occurrences(paths, bound_bytes=bound_bytes(params) // 4, emit=emit,
                          scratch=posixpath.join(work, "partitions", kind))
        for f in files.values():
            f.close()
    settle_one = functools.partial(settle_bucket, work=work, kinds=list(filled["records"]), params=params)
    leaves: dict[str, list[dict[str, Any]]] = {split: [] for split in split_shards(params["shards"],
                                                                                  params["val_fraction"])}
    dropped = collections.Counter(filled["dropped"])
    for bucket, (bucket_leaves, bucket_dropped) in zip(filled["buckets"], parallel_map(
            settle_one, filled["buckets"], processes=processes, desc="reshard: settling",
            total=len(filled["buckets"]), unit="bucket")):
        leaves[bucket["split"]] += bucket_leaves
        dropped.update(bucket_dropped)
    return {"leaves": leaves, "dropped": {k: n for k, n in dropped.items() if n}}


def drops_path(work: str, kind: str, bucket: int) -> str:
    return posixpath.join(work, "drops", f"{kind}-{bucket:06d}")


def read_positions(paths: list[str]) -> np.ndarray:
    """The sorted distinct positions (uint32) listed in some drop files (missing ones list none)."""
    parts = []
    for path in paths:
        fs, local = fsspec.core.url_to_fs(path)
        if fs.exists(local):
            parts.append(np.frombuffer(fs.cat_file(local), dtype="<u4"))
    return np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype="<u4")


def settle_bucket(bucket: dict[str, Any], *, work: str, kinds: list[str], params: dict[str, Any],
                  ) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(leaves, dropped by reason) of one step-1 bucket. A leaf is {"path", "count", "skip": drop files}."""
    skip_files = [drops_path(work, kind, bucket["id"]) for kind in kinds]
    key_drops = read_positions(skip_files[:1])
    skip = read_positions(skip_files)
    dropped = {"duplicate_key": len(key_drops), "duplicate_image": len(skip) - len(key_drops)}
    if bucket["bytes"] <= bound_bytes(params):
        return [{"path": bucket["path"], "count": bucket["samples"] - len(skip), "skip": skip_files}], dropped
    samples = (s for pos, s in enumerate(bucket_samples(bucket["path"]))
               if not is_in(skip, pos))
    name = posixpath.join(work, "buckets", posixpath.basename(bucket["path"]))
    return split_bucket(samples, name=name, nbytes=bucket["bytes"], params=params), dropped


def is_in(sorted_positions: np.ndarray, pos: int) -> bool:
    i = np.searchsorted(sorted_positions, pos)
    return bool(i < len(sorted_positions) and sorted_positions[i] == pos)


def split_bucket(samples: Iterator[dict[str, Any]], *, name: str, nbytes: int, params: dict[str, Any],
                 ) -> list[dict[str, Any]]:
    """Leaves of a bucket over the bound: its samples sent to random sub-buckets `name.NNN`, and
    those still over the bound (and holding more than one sample) split again."""
    k = min(MAX_OPEN, max(2, math.ceil(SPLIT_MARGIN * nbytes / bound_bytes(params))))
    rng = random.Random(f"reshard/{params['seed']}/split/{posixpath.basename(name)}")
    writers: dict[int, BucketWriter] = {}
    try:
        for sample in samples:
            j = rng.randrange(k)
            if j not in writers:
                writers[j] = BucketWriter(f"{name}.{j:03d}")
            writers[j].write(sample)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    leaves = []
    for j, w in sorted(writers.items()):
        w.commit()
        if w.bytes > bound_bytes(params) and w.samples > 1:  # one sample is a leaf whatever its size
            leaves += split_bucket(bucket_samples(w.url), name=f"{name}.{j:03d}",
                                   nbytes=w.bytes, params=params)
        else:
            leaves.append({"path": w.url, "count": w.samples, "skip": []})
    return leaves


def shuffled_leaf(leaf: dict[str, Any], *, split: str, n: int, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Leaf bucket `n` of a split, read whole (duplicates left out) and shuffled with its own seed."""
    skip = set(read_positions(leaf["skip"]).tolist())
    samples = [s for pos, s in enumerate(bucket_samples(leaf["path"])) if pos not in skip]
    if len(samples) != leaf["count"]:
        raise DataError(f"bucket {leaf['path']} holds {len(samples)} samples, not {leaf['count']}; delete "
                        f"its .reshard directory and run again")
    random.Random(f"reshard/{params['seed']}/{split}/{n}").shuffle(samples)
    return samples


def stream_slice(*, split: str, leaves: list[dict[str, Any]], params: dict[str, Any], start: int,
                 stop: int) -> Iterator[dict[str, Any]]:
    """Samples [start, stop) of step 3's stream: the shuffled leaf buckets one after another."""
    offset = 0
    for n, leaf in enumerate(leaves):
        if offset < stop and offset + leaf["count"] > start:
            samples = shuffled_leaf(leaf, split=split, n=n, params=params)
            yield from samples[max(0, start - offset):stop - offset]
            del samples
        offset += leaf["count"]


def write_shard(job: tuple[int, int, int], *, out: str, split: str, leaves: list[dict[str, Any]],
                params: dict[str, Any]) -> None:
    """Output shard i = stream samples [start, start + size); skipped if it was written before an
    interruption (it holds the same samples)."""
    i, start, size = job
    path = posixpath.join(out, f"{i:06d}.tar")
    fs, local = fsspec.core.url_to_fs(path)
    if fs.exists(local):
        return
    cap_ext = caption_extension(params["caption"])
    with ShardWriter(path) as writer:
        for sample in stream_slice(split=split, leaves=leaves, params=params, start=start, stop=start + size):
            writer.write(sample["__key__"], {image_extension(sample["image"]): sample["image"],
                                             cap_ext: sample["caption"]})


def write_split(out: str, *, split: str, leaves: list[dict[str, Any]], shards: int, params: dict[str, Any],
                processes: int) -> list[int]:
    """Step 3 for one split: `shards` shards of equal size (+-1), in parallel; each reads only the
    buckets its slice of the stream overlaps."""
    total = sum(leaf["count"] for leaf in leaves)
    sizes = [total // shards + (i < total % shards) for i in range(shards)]
    starts = [sum(sizes[:i]) for i in range(shards)]
    remove_temporary(out)
    write = functools.partial(write_shard, out=out, split=split, leaves=leaves, params=params)
    for _ in parallel_map(write, list(zip(range(shards), starts, sizes)), processes=processes,
                          desc=f"reshard: writing {split or 'shards'}", total=shards, unit="shard"):
        pass
    write_json(posixpath.join(out, "sizes.json"), {f"{i:06d}.tar": n for i, n in enumerate(sizes)})
    return sizes
