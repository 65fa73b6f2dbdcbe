"""`reshard`: N shards -> M balanced shards with a global shuffle in bounded memory.

Two passes (Rao's two-pass shuffle: random buckets, then a shuffle inside each bucket, gives a
uniformly random order). Pass 1 reads the inputs in order with the loader's reader, drops
duplicate keys and exact-duplicate images (first one kept), sends each sample to the train or val
split by a hash of its key, and appends it to a random bucket tar of that split under
`OUT/.reshard/`. Pass 2 cuts the concatenation of the shuffled buckets into shards of equal size
(+-1), shards in parallel, each reading (and shuffling in memory) the few buckets its slice
overlaps. Memory: pass 1 keeps every kept key and a 16-byte digest per kept image for the duplicate
checks; pass 2 one bucket (about N / min(M, 512) samples) per process.

Resume: pass 1 ends by writing `.reshard/buckets.json`; without it pass 1 starts over. Pass 2 is
deterministic given the buckets, so shards already under their final names are skipped.
`OUT/reshard.json` (parameters and counts) marks a finished run, and the buckets are removed.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import logging
import posixpath
import random
from typing import Any, Iterator

import fsspec
from tqdm import tqdm

from clipscale.data.shards import DataError
from clipscale.data_tools.shardio import (ShardWriter, caption_extension, image_extension, member_key, parallel_map, read_json,
                                read_shard, remove_temporary, write_json)

log = logging.getLogger(__name__)
MAX_BUCKETS = 512  # bucket files open at once in pass 1


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
            caption: str = "txt", drop_duplicate_images: bool = True, processes: int = 1) -> dict[str, Any]:
    """Reshard `urls` into `out`; returns {"splits": {split: [samples per shard]}, "dropped": {reason: n}}.
    Keep `drop_duplicate_images` off for sets that pair one image with several captions (COCO-style)."""
    if shards < 1 or not 0 <= val_fraction < 1:
        raise DataError(f"shards={shards} must be >= 1 and val_fraction={val_fraction} in [0, 1)")
    params = {"inputs": urls, "shards": shards, "val_fraction": val_fraction, "seed": seed, "caption": caption,
              "drop_duplicate_images": drop_duplicate_images}
    fs, root = fsspec.core.url_to_fs(out)
    done = read_json(posixpath.join(out, "reshard.json"))
    if done is not None and done["params"] == params:
        log.info("%s is already resharded with these parameters", out)
        return done["result"]
    tmp = posixpath.join(out, ".reshard")
    buckets = read_json(posixpath.join(tmp, "buckets.json"))
    if buckets is not None and buckets["params"] != params:
        raise DataError(f"{out} holds an interrupted reshard with other parameters; delete {tmp} or use a new "
                        "output directory")
    if buckets is None:
        if fs.exists(root) and [p for p in fs.ls(root, detail=False) if posixpath.basename(p) != ".reshard"]:
            raise DataError(f"output directory {out} is not empty; reshard writes into a new or empty directory")
        if fs.exists(posixpath.join(root, ".reshard")):
            fs.rm(posixpath.join(root, ".reshard"), recursive=True)
        buckets = {"params": params, **fill_buckets(urls, tmp, params)}
        write_json(posixpath.join(tmp, "buckets.json"), buckets)
    splits = {split: write_split(tmp, posixpath.join(out, split) if split else out, split=split,
                                 counts=counts, shards=split_shards(shards, val_fraction)[split], params=params,
                                 processes=processes)
              for split, counts in buckets["counts"].items()}
    result = {"splits": splits, "dropped": buckets["dropped"]}
    write_json(posixpath.join(out, "reshard.json"), {"params": params, "result": result})
    fs.rm(posixpath.join(root, ".reshard"), recursive=True)
    log.info("resharded %d samples into %s (dropped %s)", sum(map(sum, splits.values())), out,
             buckets["dropped"] or "none")
    return result


def fill_buckets(urls: list[str], tmp: str, params: dict[str, Any]) -> dict[str, Any]:
    """Pass 1: every kept sample into a random bucket of its split; counts per bucket and drops by reason."""
    shards = split_shards(params["shards"], params["val_fraction"])
    n_buckets = {split: min(n, MAX_BUCKETS) for split, n in shards.items()}
    writers = {split: [ShardWriter(posixpath.join(tmp, f"{split or 'all'}-{b:06d}.tar")) for b in range(n)]
               for split, n in n_buckets.items()}
    rng = random.Random(f"reshard/{params['seed']}")
    counters: collections.Counter = collections.Counter()
    keys: set[str] = set()
    images: set[bytes] = set()
    cap_ext = caption_extension(params["caption"])
    samples = (s for url in urls for s in read_shard(url, caption=params["caption"], counters=counters))
    try:
        for sample in tqdm(samples, desc="reshard: bucketing", unit="sample", disable=None):
            key = member_key(sample["__key__"])
            digest = hashlib.blake2b(sample["image"], digest_size=16).digest()
            reason = ("unsafe_member_name" if key is None else "duplicate_key" if key in keys
                      else "duplicate_image" if params["drop_duplicate_images"] and digest in images else None)
            if reason:
                counters[reason] += 1
                continue
            keys.add(key)
            images.add(digest)
            split = ("val" if val_split(key, params["val_fraction"]) else "train") if params["val_fraction"] else ""
            bucket = writers[split][rng.randrange(n_buckets[split])]
            bucket.write(key, {image_extension(sample["image"]): sample["image"], cap_ext: sample["caption"]})
    except BaseException:
        for w in (w for ws in writers.values() for w in ws):
            w.abort()
        raise
    for w in (w for ws in writers.values() for w in ws):
        w.commit()
    return {"counts": {split: [w.samples for w in ws] for split, ws in writers.items()}, "dropped": dict(counters)}


def shuffled_bucket(tmp: str, b: int, *, split: str, count: int, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Bucket `b` of a split, read whole and shuffled with its own seed."""
    counters: collections.Counter = collections.Counter()
    samples = list(read_shard(posixpath.join(tmp, f"{split or 'all'}-{b:06d}.tar"), caption=params["caption"],
                              counters=counters))
    if len(samples) != count or counters:
        raise DataError(f"bucket {b} of {tmp} holds {len(samples)} samples, not {count} ({dict(counters)}); "
                        f"delete {tmp} and run again")
    random.Random(f"reshard/{params['seed']}/{split}/{b}").shuffle(samples)
    return samples


def stream_slice(tmp: str, *, split: str, counts: list[int], params: dict[str, Any], start: int,
                 stop: int) -> Iterator[dict[str, Any]]:
    """Samples [start, stop) of pass 2's stream: the shuffled buckets one after another."""
    offset = 0
    for b, count in enumerate(counts):
        if offset < stop and offset + count > start:
            samples = shuffled_bucket(tmp, b, split=split, count=count, params=params)
            yield from samples[max(0, start - offset):stop - offset]
        offset += count


def write_shard(job: tuple[int, int, int], *, tmp: str, out: str, split: str, counts: list[int],
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
        for sample in stream_slice(tmp, split=split, counts=counts, params=params, start=start, stop=start + size):
            writer.write(sample["__key__"], {image_extension(sample["image"]): sample["image"],
                                             cap_ext: sample["caption"]})


def write_split(tmp: str, out: str, *, split: str, counts: list[int], shards: int, params: dict[str, Any],
                processes: int) -> list[int]:
    """Pass 2 for one split: `shards` shards of equal size (+-1), in parallel; each reads only the
    buckets its slice of the stream overlaps."""
    total = sum(counts)
    sizes = [total // shards + (i < total % shards) for i in range(shards)]
    starts = [sum(sizes[:i]) for i in range(shards)]
    remove_temporary(out)
    write = functools.partial(write_shard, tmp=tmp, out=out, split=split, counts=counts, params=params)
    for _ in parallel_map(write, list(zip(range(shards), starts, sizes)), processes=processes,
                          desc=f"reshard: writing {split or 'shards'}", total=shards, unit="shard"):
        pass
    write_json(posixpath.join(out, "sizes.json"), {f"{i:06d}.tar": n for i, n in enumerate(sizes)})
    return sizes
