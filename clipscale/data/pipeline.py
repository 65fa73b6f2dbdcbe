"""The streaming training loader: shards -> logical streams -> world-size-invariant batches.

Design. The data is split into `num_streams` logical streams S, fixed by the recipe. Epoch e deals
a seeded permutation of the shards to the streams (stream s reads shards s, s+S, ...); a stream
is the endless concatenation of its epochs, so no stream runs dry and every rank yields the same
number of batches however uneven the shards are. Each step, every stream contributes a sub-batch
of B_global / S samples; rank r owns streams [r*S/W, (r+1)*S/W) and its batch is their
sub-batches in stream order. The global batch therefore depends on neither the world size W nor
the number of workers, and resuming only needs each stream's position.

State (`state_dict()`), counted in samples:
    {"version": 1, "num_streams": S, "positions": [raw samples consumed by stream s, ...]}
A stream resumes by re-reading its shards from the start of the run without decoding.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, Callable, Iterator

import fsspec
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tar_file_iterator

from clipscale.data.config import DataConfig
from clipscale.data.decode import decode_crop
from clipscale.data.shards import DataError, check_shards_exist, expand_shards

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
STATE_VERSION = 1


@dataclasses.dataclass
class Batch:
    images: torch.Tensor  # (B, 3, H, W) uint8
    texts: torch.Tensor  # (B, L) int64
    keys: list[str]


@dataclasses.dataclass
class SubBatch:
    stream: int
    position: int  # raw samples this stream has consumed after this sub-batch
    counters: dict[str, int]  # the stream's running counters
    images: torch.Tensor
    texts: torch.Tensor
    keys: list[str]


def normalize_images(images: torch.Tensor, *, mean, std) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 normalised, once per batch on the batch's device."""
    mean = torch.tensor(mean, device=images.device, dtype=torch.float32).view(1, 3, 1, 1) * 255
    std = torch.tensor(std, device=images.device, dtype=torch.float32).view(1, 3, 1, 1) * 255
    return (images.float() - mean) / std


def stream_shards(urls: list[str], *, stream: int, num_streams: int, epoch: int, seed: int) -> list[str]:
    """Shards stream `stream` reads in epoch `epoch`: its share of that epoch's permutation."""
    order = np.random.default_rng([seed, epoch]).permutation(len(urls))
    return [urls[i] for i in order[stream::num_streams]]


def raw_samples(urls: list[str], *, stream: int, num_streams: int, seed: int, caption: str,
                counters: collections.Counter) -> Iterator[dict[str, Any]]:
    """Endless raw (undecoded) samples of a stream: {"__key__", "image", "caption"} dicts."""
    wanted = set(IMAGE_EXTENSIONS) | {caption}

    def select(name: str) -> bool:
        return name.rsplit(".", 1)[-1].lower() in wanted

    epoch = 0
    while True:
        for url in stream_shards(urls, stream=stream, num_streams=num_streams, epoch=epoch, seed=seed):
            yield from _shard_samples(url, select=select, caption=caption, counters=counters)
        epoch += 1


def _shard_samples(url: str, *, select: Callable[[str], bool], caption: str,
                   counters: collections.Counter) -> Iterator[dict[str, Any]]:
    current: dict[str, Any] = {}
    with fsspec.open(url, "rb") as f:
        for member in tar_file_iterator(f, select_files=select):
            key, ext = member["fname"].split(".", 1) if "." in member["fname"] else (member["fname"], "")
            if current and current["__key__"] != key:
                yield from _complete(current, counters)
                current = {}
            current["__key__"] = key
            current["caption" if ext == caption else "image"] = member["data"]
    if current:
        yield from _complete(current, counters)


def _complete(sample: dict[str, Any], counters: collections.Counter) -> Iterator[dict[str, Any]]:
    if "image" not in sample:
        counters["missing_image"] += 1
    elif "caption" not in sample:
        counters["missing_caption"] += 1
    else:
        yield sample


def shuffled(samples: Iterator[dict], *, buffer: int, rng: np.random.Generator) -> Iterator[dict]:
    """Reservoir-style shuffle buffer; deterministic given `rng`."""
    if buffer <= 1:
        yield from samples
        return
    pool: list[dict] = []
    for sample in samples:
        if len(pool) < buffer:
            pool.append(sample)
            continue
        i = int(rng.integers(buffer))
        yield pool[i]
        pool[i] = sample


class StreamReader:
    """One logical stream: raw samples -> shuffle -> decode/augment -> tokenised sub-batches."""

    def __init__(self, cfg: DataConfig, urls: list[str], *, stream: int, seed: int, start: int,
                 image_size: int, tokenizer: Callable) -> None:
        self.cfg, self.stream, self.seed = cfg, stream, seed
        self.image_size, self.tokenizer = image_size, tokenizer
        self.counters: collections.Counter = collections.Counter()
        raw = raw_samples(urls, stream=stream, num_streams=cfg.num_streams, seed=seed,
                          caption=cfg.caption_key, counters=self.counters)
        self.samples = shuffled(raw, buffer=cfg.shuffle_buffer, rng=np.random.default_rng([seed, stream, 1]))
        self.position = 0
        for _ in range(start):  # fast-forward without decoding
            next(self.samples)
            self.position += 1

    def next_sub_batch(self, size: int) -> SubBatch:
        images, captions, keys = [], [], []
        while len(images) < size:
            sample = next(self.samples)
            self.position += 1
            rng = np.random.default_rng([self.seed, self.stream, 2, self.position])  # per-sample augmentation
            try:
                images.append(decode_crop(sample["image"], size=self.image_size, rng=rng,
                                          scale=(self.cfg.crop_scale_min, 1.0)))
                captions.append(sample["caption"].decode("utf-8"))
            except Exception as e:  # noqa: BLE001 - any undecodable sample is skipped and counted
                self.counters[f"bad_{type(e).__name__}"] += 1
                if len(images) > len(captions):
                    images.pop()
                continue
            keys.append(sample["__key__"])
            self.counters["samples"] += 1
        return SubBatch(stream=self.stream, position=self.position, counters=dict(self.counters),
                        images=torch.from_numpy(np.stack(images)), texts=self.tokenizer(captions), keys=keys)


class _WorkerStreams(IterableDataset):
    """Yields, per step, one sub-batch for each stream owned by this dataloader worker."""

    def __init__(self, cfg: DataConfig, urls: list[str], *, streams: list[int], sub_batch: int,
                 positions: list[int], seed: int, image_size: int, tokenizer: Callable) -> None:
        self.cfg, self.urls, self.streams, self.sub_batch = cfg, urls, streams, sub_batch
        self.positions, self.seed, self.image_size, self.tokenizer = positions, seed, image_size, tokenizer

    def __iter__(self) -> Iterator[SubBatch]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        mine = self.streams[worker::workers]
        readers = [StreamReader(self.cfg, self.urls, stream=s, seed=self.seed, start=self.positions[s],
                                image_size=self.image_size, tokenizer=self.tokenizer) for s in mine]
        while True:
            for reader in readers:
                yield reader.next_sub_batch(self.sub_batch)


class TrainLoader:
    """Iterable of this rank's `Batch`es; see the module docstring for the design and state."""

    def __init__(self, cfg: DataConfig, urls: list[str], *, tokenizer: Callable, image_size: int,
                 batch_size: int, rank: int, world_size: int, seed: int) -> None:
        self.cfg, self.urls, self.tokenizer, self.image_size = cfg, urls, tokenizer, image_size
        self.seed = seed
        per_rank = cfg.num_streams // world_size
        self.streams = list(range(rank * per_rank, (rank + 1) * per_rank))
        self.sub_batch = batch_size // per_rank
        self.positions = [0] * cfg.num_streams
        self._counters: dict[int, dict[str, int]] = {}

    def __iter__(self) -> Iterator[Batch]:
        dataset = _WorkerStreams(self.cfg, self.urls, streams=self.streams, sub_batch=self.sub_batch,
                                 positions=list(self.positions), seed=self.seed,
                                 image_size=self.image_size, tokenizer=self.tokenizer)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.cfg.workers,
                            persistent_workers=False, prefetch_factor=2 if self.cfg.workers else None)
        parts = iter(loader)
        while True:
            # Workers own streams round-robin and the DataLoader returns worker outputs
            # round-robin, so the next len(streams) items are exactly one step of every stream.
            subs = sorted((next(parts) for _ in self.streams), key=lambda sb: sb.stream)
            for sb in subs:
                self.positions[sb.stream] = sb.position
                self._counters[sb.stream] = sb.counters
            yield Batch(images=torch.cat([sb.images for sb in subs]), texts=torch.cat([sb.texts for sb in subs]),
                        keys=[k for sb in subs for k in sb.keys])

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "num_streams": self.cfg.num_streams, "positions": list(self.positions)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_streams") != self.cfg.num_streams:
            raise DataError(
                f"checkpoint loader state has num_streams={state.get('num_streams')}, the config has "
                f"data.num_streams={self.cfg.num_streams}; resume with the same data.num_streams"
            )
        self.positions = list(state["positions"])

    def counters(self) -> dict[str, int]:
        total: collections.Counter = collections.Counter()
        for c in self._counters.values():
            total.update(c)
        return dict(total)


def build_train_loader(cfg: DataConfig, *, tokenizer: Callable, image_size: int, batch_size: int,
                       rank: int, world_size: int, seed: int) -> TrainLoader:
    """Validate the shard spec and stream layout against the launch, then build the loader."""
    urls = expand_shards(cfg.train_shards)
    check_shards_exist(urls, spec=cfg.train_shards)
    workers = max(cfg.workers, 1)
    if cfg.num_streams % (world_size * workers):
        raise DataError(
            f"data.num_streams={cfg.num_streams} must be a multiple of world size x data.workers = "
            f"{world_size} x {workers}; set data.num_streams to a multiple of {world_size * workers}"
        )
    if (batch_size * world_size) % cfg.num_streams:
        raise DataError(
            f"the global batch {batch_size * world_size} must be a multiple of data.num_streams="
            f"{cfg.num_streams}; change train.global_batch_size or data.num_streams"
        )
    if len(urls) < cfg.num_streams:
        raise DataError(
            f"data.train_shards has {len(urls)} shards, fewer than data.num_streams={cfg.num_streams}; "
            f"lower data.num_streams or reshard into more shards"
        )
    return TrainLoader(cfg, urls, tokenizer=tokenizer, image_size=image_size, batch_size=batch_size,
                       rank=rank, world_size=world_size, seed=seed)
