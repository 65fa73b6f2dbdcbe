"""Logical streams: which shards each stream reads, in what order, and how far it has got.

Exact epochs. Epoch e permutes the shards with seed (seed, e) and deals them to the streams,
each shard to the stream with the fewest samples so far (by sizes), so streams get nearly equal
shares. A stream reads its list in blocks of `block_shards` shards; a shuffle buffer mixes the
samples of one block. Every stream yields the same quota of good samples per epoch (the smallest
stream's share, rounded down to whole sub-batches), so every rank yields the same number of batches
and no sample is seen twice in an epoch; the tail beyond the quota is left for the next epoch's
permutation. A stream that runs short (bad samples, unreadable shards) borrows from the start of
its next epoch's list and counts those samples as `epoch_overrun`.

Resampled. Block b of stream s is `block_shards` shards drawn with replacement, seed (seed, s, b),
with probabilities proportional to the shard weights. There are no epochs or quotas.

State per stream (`StreamState`) is a few integers plus counters; resuming re-reads at most one
block without decoding to rebuild the shuffle buffer exactly.
"""
from __future__ import annotations

import collections
import dataclasses
import heapq
import random
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import get_worker_info

from clipscale.data.config import DataConfig
from clipscale.data.decode import JpegCrop, decode_crop
from clipscale.data.shards import BadSample, DataError, caption_text, shard_samples

NOT_SAMPLE_COUNTS = {"samples", "epoch_overrun", "truncated_shard", "unreadable_shard"}
MIN_SAMPLES_FOR_BAD_FRACTION = 100


@dataclasses.dataclass
class StreamState:
    epoch: int = 0  # exact epochs: the epoch whose quota is being filled
    taken: int = 0  # good samples yielded towards that quota
    list_epoch: int = 0  # epoch whose shard list is being read (epoch + 1 after an overrun)
    block: int = 0  # block within that list (resampled: running block index)
    offset: int = 0  # samples taken out of the block's shuffle buffer
    consumed: dict[str, int] = dataclasses.field(default_factory=dict)  # counted when taken
    read: dict[str, int] = dataclasses.field(default_factory=dict)  # counted when read, up to this block


class StreamPlan:
    """The shards of every (stream, epoch, block) and the per-epoch quotas: pure functions of the
    shard list, sizes, weights, seed, `num_streams`, `block_shards` and the sub-batch size."""

    def __init__(self, urls: list[str], *, sizes: list[int], weights: list[float], cfg: DataConfig,
                 sub_batch: int, seed: int) -> None:
        self.urls, self.sizes, self.sub_batch, self.seed = urls, sizes, sub_batch, seed
        self.num_streams, self.block_shards, self.resampled = cfg.num_streams, cfg.block_shards, cfg.resampled
        self.probs = np.asarray(weights, dtype=np.float64) / sum(weights)
        self._deals: dict[int, tuple[list[list[int]], list[int]]] = {}

    def deal(self, epoch: int) -> tuple[list[list[int]], list[int]]:
        """Epoch `epoch`: shard indices per stream and samples per stream (greedy balance by size)."""
        if epoch not in self._deals:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.urls))
            lists: list[list[int]] = [[] for _ in range(self.num_streams)]
            heap = [(0, s) for s in range(self.num_streams)]
            for i in order:
                load, s = heapq.heappop(heap)
                lists[s].append(int(i))
                heapq.heappush(heap, (load + self.sizes[i], s))
            loads = [sum(self.sizes[i] for i in shards) for shards in lists]
            self._deals = {k: v for k, v in self._deals.items() if k >= epoch - 1}
            self._deals[epoch] = (lists, loads)
        return self._deals[epoch]

    def block(self, stream: int, *, epoch: int, block: int) -> list[str] | None:
        """Shard URLs of a block; None past the end of the stream's list for that epoch."""
        if self.resampled:
            rng = np.random.default_rng([self.seed, stream, block])
            return [self.urls[i] for i in rng.choice(len(self.urls), size=self.block_shards, p=self.probs)]
        shards = self.deal(epoch)[0][stream][block * self.block_shards:(block + 1) * self.block_shards]
        return [self.urls[i] for i in shards] or None

    def quota(self, epoch: int) -> int | None:
        """Good samples every stream yields in `epoch`: whole sub-batches of the smallest share."""
        if self.resampled:
            return None
        return max(self.sub_batch, min(self.deal(epoch)[1]) // self.sub_batch * self.sub_batch)


@dataclasses.dataclass
class SubBatch:
    stream: int
    state: dict[str, Any]  # the stream's StreamState after this sub-batch, plus running "totals"
    images: torch.Tensor  # (b, 3, H, W) uint8
    texts: np.ndarray  # (b, L) int64: small, so it travels inside the message, not as a shared-memory file
    keys: list[str]
    slot: int = -1  # the worker's shared image buffer holding `images` (-1: not a pooled one)
    jpegs: list[tuple[int, JpegCrop]] = dataclasses.field(default_factory=list)  # (row, JPEG) left to the device

    def pin_memory(self) -> SubBatch:
        """A copy with its images in pinned memory (the DataLoader's pin thread calls this). The slot's
        shared buffer is then released once the pinned copy is, a little later than it could be."""
        return dataclasses.replace(self, images=self.images.pin_memory())


def shuffled(samples: Iterator[dict], *, buffer: int, rng: random.Random) -> Iterator[dict]:
    """Shuffle buffer over a finite iterator (drained at its end); deterministic given `rng`."""
    if buffer <= 1:
        yield from samples
        return
    pool: list[dict] = []
    for sample in samples:
        if len(pool) < buffer:
            pool.append(sample)
            continue
        i = rng.randrange(buffer)
        yield pool[i]
        pool[i] = sample
    rng.shuffle(pool)
    yield from pool


class StreamReader:
    """One logical stream: blocks of raw samples -> shuffle -> decode/augment -> tokenised sub-batches."""

    def __init__(self, plan: StreamPlan, cfg: DataConfig, *, stream: int, state: StreamState,
                 image_size: int, tokenizer: Callable) -> None:
        self.plan, self.cfg, self.stream, self.state = plan, cfg, stream, state
        self.image_size, self.tokenizer = image_size, tokenizer
        self.consumed = collections.Counter(state.consumed)
        self.read_base = collections.Counter(state.read)
        self.read_live: collections.Counter = collections.Counter()  # this block; rebuilt by replay
        self.failed_in_a_row = 0
        self._open_block()

    def _open_block(self) -> None:
        st = self.state
        while (urls := self.plan.block(self.stream, epoch=st.list_epoch, block=st.block)) is None:
            st.list_epoch, st.block, st.offset = st.list_epoch + 1, 0, 0
        raw = (sample for url in urls for sample in self._shard(url))
        rng = random.Random(f"shuffle/{self.plan.seed}/{self.stream}/{st.list_epoch}/{st.block}")
        self.samples = shuffled(raw, buffer=self.cfg.shuffle_buffer, rng=rng)
        for _ in range(st.offset):  # resume: rebuild the shuffle buffer without decoding
            next(self.samples)

    def _shard(self, url: str) -> Iterator[dict[str, Any]]:
        delivered = False
        for sample in shard_samples(url, caption=self.cfg.caption_key, counters=self.read_live,
                                    retries=self.cfg.shard_retries, backoff_s=self.cfg.retry_backoff_s,
                                    timeout_s=self.cfg.read_timeout_s):
            delivered, self.failed_in_a_row = True, 0
            yield {**sample, "__url__": url}
        if not delivered:
            self.failed_in_a_row += 1
            if self.failed_in_a_row >= self.cfg.max_failed_shards:
                raise DataError(f"{self.failed_in_a_row} shards in a row gave no sample (last: {url}); "
                                f"check data.train_shards and the storage (data.max_failed_shards)")

    def _next_block(self, *, epoch: int | None = None) -> None:
        st = self.state
        self.read_base.update(self.read_live)
        self.read_live.clear()
        if epoch is None:
            st.block, st.offset = st.block + 1, 0
        else:
            st.list_epoch, st.block, st.offset = epoch, 0, 0
        self._open_block()

    def _next_raw(self) -> dict[str, Any]:
        while True:
            try:
                sample = next(self.samples)
            except StopIteration:
                self._next_block()
                continue
            self.state.offset += 1
            return sample

    def _take(self) -> tuple[np.ndarray | JpegCrop, str, str]:
        """The next good sample (image, caption, key), counting bad ones and epoch boundaries."""
        st = self.state
        while True:
            quota = self.plan.quota(st.epoch)
            if quota is not None and st.taken >= quota:
                st.epoch, st.taken = st.epoch + 1, 0
                if st.list_epoch < st.epoch:  # leave the rest of this epoch's list unread
                    self._next_block(epoch=st.epoch)
            sample = self._next_raw()
            # per-sample crop randomness, a pure function of the sample's place (Mersenne Twister
            # seeded from a string: ~4 us, a third of numpy's SeedSequence + PCG64 set-up)
            rng = random.Random(f"crop/{self.plan.seed}/{self.stream}/{st.list_epoch}/{st.block}/{st.offset}")
            try:
                text = caption_text(sample["caption"], caption=self.cfg.caption_key)
                image = decode_crop(sample["image"], size=self.image_size, rng=rng,
                                    scale=(self.cfg.crop_scale_min, 1.0),
                                    jpeg_to_device=self.cfg.decode_device == "cuda")
            except BadSample as e:
                self.consumed[e.reason] += 1
                self._check_bad_fraction()
                continue
            self.consumed["samples"] += 1
            if quota is not None:
                st.taken += 1
            if st.list_epoch > st.epoch:
                self.consumed["epoch_overrun"] += 1
            return image, text, sample["__key__"]

    def _check_bad_fraction(self) -> None:
        totals = self.totals()
        bad = sum(n for reason, n in totals.items() if reason not in NOT_SAMPLE_COUNTS)
        seen = bad + totals["samples"]
        if seen >= MIN_SAMPLES_FOR_BAD_FRACTION and bad > self.cfg.max_bad_fraction * seen:
            reasons = ", ".join(f"{r}={n}" for r, n in sorted(totals.items()) if r not in NOT_SAMPLE_COUNTS)
            raise DataError(f"stream {self.stream}: {bad} of {seen} samples were bad ({reasons}), more than "
                            f"data.max_bad_fraction={self.cfg.max_bad_fraction}; fix the shards or raise the limit")

    def totals(self) -> collections.Counter:
        return self.consumed + self.read_base + self.read_live

    def next_sub_batch(self, size: int, *, out: torch.Tensor | None = None, slot: int = -1) -> SubBatch:
        """The next `size` good samples; images stacked into `out` (pool `slot`) when given. A JPEG left to
        the device (`data.decode_device="cuda"`) is listed in `jpegs` and its row left blank."""
        images, captions, keys = zip(*(self._take() for _ in range(size)))
        state = dataclasses.replace(self.state, consumed=dict(self.consumed), read=dict(self.read_base))
        jpegs = [(row, image) for row, image in enumerate(images) if isinstance(image, JpegCrop)]
        if out is None:
            out = torch.empty(size, 3, self.image_size, self.image_size, dtype=torch.uint8)
            if get_worker_info() is not None:  # handed to the training process without another copy
                out.share_memory_()
        rows = out.numpy()  # (size, 3, H, W): each image is copied once, into its row; decoded images
        for row, image in enumerate(images):  # may be read-only (PIL's), which torch.from_numpy warns of
            rows[row] = 0 if isinstance(image, JpegCrop) else image
        return SubBatch(stream=self.stream, state={**dataclasses.asdict(state), "totals": dict(self.totals())},
                        images=out, texts=self.tokenizer(list(captions)).numpy(), keys=list(keys), slot=slot,
                        jpegs=jpegs)
