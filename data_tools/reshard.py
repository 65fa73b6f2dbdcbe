"""`reshard`: N shards -> M balanced shards with a global shuffle in bounded memory.

Two passes (Rao's two-pass shuffle: random buckets, then a shuffle inside each bucket, gives a
uniformly random order). Pass 1 reads the inputs in order with the loader's reader, drops
duplicate keys and exact-duplicate images (first one kept), sends each sample to the train or val
split by a hash of its key, and appends it to a random bucket tar of that split under
`OUT/.reshard/`. Pass 2 reads the buckets one at a time, shuffles each in memory and cuts the
concatenation into shards of equal size (+-1). Memory: one bucket, about N / min(M, 512) samples,
plus every kept key and a 16-byte digest per kept image for the duplicate checks.

Resume: pass 1 ends by writing `.reshard/buckets.json`; without it pass 1 starts over. Pass 2 is
deterministic given the buckets, so shards already under their final names are skipped.
`OUT/reshard.json` (parameters and counts) marks a finished run, and the buckets are removed.
"""
from __future__ import annotations

import collections
import hashlib
import logging
import posixpath
import random
from typing import Any, Iterator

import fsspec
from tqdm import tqdm

from clipscale.data.shards import DataError
from data_tools.shardio import (ShardWriter, caption_extension, image_extension, member_key, read_json, read_shard,
                                remove_temporary, write_json)

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
            caption: str = "txt") -> dict[str, Any]:
    """Reshard `urls` into `out`; returns {"splits": {split: [samples per shard]}, "dropped": {reason: n}}."""
    if shards < 1 or not 0 <= val_fraction < 1:
        raise DataError(f"shards={shards} must be >= 1 and val_fraction={val_fraction} in [0, 1)")
    params = {"inputs": urls, "shards": shards, "val_fraction": val_fraction, "seed": seed, "caption": caption}
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
                                 counts=counts, shards=split_shards(shards, val_fraction)[split], params=params)
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
                      else "duplicate_image" if digest in images else None)
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


def shuffled_buckets(tmp: str, *, split: str, counts: list[int], params: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Pass 2's stream: each bucket read whole, shuffled with its own seed, in bucket order."""
    for b in range(len(counts)):
        counters: collections.Counter = collections.Counter()
        samples = list(read_shard(posixpath.join(tmp, f"{split or 'all'}-{b:06d}.tar"),
                                  caption=params["caption"], counters=counters))
        if len(samples) != counts[b] or counters:
            raise DataError(f"bucket {b} of {tmp} holds {len(samples)} samples, not {counts[b]} ({dict(counters)}); "
                            f"delete {tmp} and run again")
        random.Random(f"reshard/{params['seed']}/{split}/{b}").shuffle(samples)
        yield from samples


def write_split(tmp: str, out: str, *, split: str, counts: list[int], shards: int,
                params: dict[str, Any]) -> list[int]:
    """Pass 2 for one split: `shards` shards of equal size (+-1), skipping those already written."""
    total = sum(counts)
    sizes = [total // shards + (i < total % shards) for i in range(shards)]
    fs, root = fsspec.core.url_to_fs(out)
    remove_temporary(out)
    cap_ext = caption_extension(params["caption"])
    stream = shuffled_buckets(tmp, split=split, counts=counts, params=params)
    for i, size in enumerate(tqdm(sizes, desc=f"reshard: writing {split or 'shards'}", unit="shard", disable=None)):
        path = posixpath.join(out, f"{i:06d}.tar")
        if fs.exists(posixpath.join(root, f"{i:06d}.tar")):  # written before an interruption: same samples
            for _ in range(size):
                next(stream)
            continue
        with ShardWriter(path) as writer:
            for _ in range(size):
                sample = next(stream)
                writer.write(sample["__key__"], {image_extension(sample["image"]): sample["image"],
                                                 cap_ext: sample["caption"]})
    write_json(posixpath.join(out, "sizes.json"), {f"{i:06d}.tar": n for i, n in enumerate(sizes)})
    return sizes
