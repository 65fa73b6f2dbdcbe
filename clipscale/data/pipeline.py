"""The streaming training loader: shards -> logical streams -> world-size-invariant batches.

The data is split into `num_streams` logical streams S, fixed by the recipe or else by the data
and the launch (`resolve_num_streams`; see
`clipscale.data.streams` for how shards are dealt to streams). Each step every stream contributes
a sub-batch of B_global / S samples; rank r owns streams [r*S/W, (r+1)*S/W) and its batch is
their sub-batches in stream order; a rank's dataloader workers own its streams round-robin. The
global batch therefore depends on neither the world size W nor the number of workers, every
rank yields a batch at every step whatever the shard sizes, and the loader's state is just
each stream's `StreamState`:
    {"version": 2, "resampled": bool, "num_streams": S, "streams": [StreamState as dict, ...]}
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import multiprocessing
import os
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipscale.data.config import DataConfig
from clipscale.data.decode import JpegCrop, decode_jpegs_on
from clipscale.data.shards import DataError, check_first_shards, expand_sources, read_sizes, shard_weights
from clipscale.data.streams import StreamPlan, StreamReader, StreamState, SubBatch
from clipscale.dist import init_loader_worker, rank0_value

log = logging.getLogger(__name__)
STATE_VERSION = 2
STATE_FIELDS = {f.name for f in dataclasses.fields(StreamState)}
DEFAULT_STREAMS = 4  # data.num_streams when the recipe leaves it unset and the launch allows it
POOL_SLOTS = 6  # shared image buffers per stream: in flight (prefetch 2), held by the trainer (2), spare
CPU = torch.device("cpu")


@dataclasses.dataclass
class Batch:
    """One step of this rank. Images stay in the workers' per-stream parts until `images_on` joins
    them on the training device: joining on the host would copy every batch once more in the
    training process (~20% of a 2-core machine's loader throughput). The parts are shared-memory
    buffers that a worker reuses once this process holds no reference to them: copy them before
    handing them to another process. For a CUDA device, parts and texts arrive in pinned (page-locked)
    memory, copied there by the DataLoader's pin thread, so the non_blocking copies to the device
    overlap the step instead of blocking it."""
    image_parts: list[torch.Tensor]  # per stream, in stream order: (b, 3, H, W) uint8
    texts: torch.Tensor  # (B, L) int64
    keys: list[str]
    jpegs: list[tuple[int, JpegCrop]] = dataclasses.field(default_factory=list)  # (row, JPEG) decoded on the device

    def images_on(self, device: torch.device) -> torch.Tensor:
        """(B, 3, H, W) uint8 on `device`: each part copied there, then joined there, and the JPEGs left
        to the device decoded into their rows."""
        images = torch.cat([part.to(device, non_blocking=True) for part in self.image_parts])
        if self.jpegs:
            rows = torch.tensor([row for row, _ in self.jpegs], device=device)
            images[rows] = decode_jpegs_on([jpeg for _, jpeg in self.jpegs], size=images.shape[-1], device=device)
        return images


def normalize_images(images: torch.Tensor, *, mean, std) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 normalised, once per batch on the batch's device."""
    mean, std = _pixel_stats(tuple(mean), tuple(std), images.device)
    return (images.float() - mean) / std


@functools.lru_cache(maxsize=8)
def _pixel_stats(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 3, 1, 1) mean and std in uint8 pixel units on `device`, built once: a tensor made from a
    Python list is a blocking host-to-device copy, which every step would otherwise pay."""
    def pixels(values):
        return torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1).mul(255).to(device)
    return pixels(mean), pixels(std)


class SharedBuffers:
    """A worker's reusable shared-memory image buffers for one stream.

    A fresh shared-memory buffer per sub-batch costs a page fault per 4 KiB in the worker (~100 us
    per 224 px image here, a tenth of its decode time), so a buffer is reused once the training
    process no longer references it. `free` is a shared flag per slot: the worker clears it when it
    fills the slot; the training process sets it when its last reference to that slot's storage
    dies (`TrainLoader._reclaim`). With no free slot a one-off buffer is used, so a consumer that
    keeps batches is never overwritten, only slower.
    """

    def __init__(self, free: torch.Tensor) -> None:
        self.free = free  # (POOL_SLOTS,) uint8, in shared memory
        self.buffers: dict[int, torch.Tensor] = {}

    def take(self, shape: tuple[int, ...]) -> tuple[int, torch.Tensor | None]:
        """(slot, buffer) to fill, or (-1, None) when every slot is still in use."""
        for slot, free in enumerate(self.free.tolist()):  # one read each: the trainer may be setting flags
            if not free:
                continue
            if slot not in self.buffers:
                self.buffers[slot] = torch.empty(shape, dtype=torch.uint8).share_memory_()
            self.free[slot] = 0
            return slot, self.buffers[slot]
        return -1, None


class _WorkerStreams(IterableDataset):
    """Yields, per step, one sub-batch for each stream owned by this dataloader worker."""

    def __init__(self, plan: StreamPlan, cfg: DataConfig, *, states: dict[int, StreamState],
                 image_size: int, tokenizer: Callable, free: torch.Tensor) -> None:
        self.plan, self.cfg, self.states = plan, cfg, states
        self.image_size, self.tokenizer, self.free = image_size, tokenizer, free

    def __iter__(self) -> Iterator[SubBatch]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        streams = sorted(self.states)  # row r of `free` belongs to streams[r]
        rows = range(worker, len(streams), workers)
        readers = [StreamReader(self.plan, self.cfg, stream=streams[r],
                                state=dataclasses.replace(self.states[streams[r]]),
                                image_size=self.image_size, tokenizer=self.tokenizer) for r in rows]
        pools = [SharedBuffers(self.free[r]) if info else None for r in rows]  # in-process: nothing to share
        shape = (self.plan.sub_batch, 3, self.image_size, self.image_size)
        while True:
            for reader, pool in zip(readers, pools):
                slot, out = pool.take(shape) if pool else (-1, None)
                yield reader.next_sub_batch(self.plan.sub_batch, out=out, slot=slot)


class TrainLoader:
    """Iterable of this rank's `Batch`es; see the module docstring for the design and state."""

    def __init__(self, plan: StreamPlan, cfg: DataConfig, *, tokenizer: Callable, image_size: int,
                 rank: int, world_size: int, device: torch.device = CPU) -> None:
        self.plan, self.cfg, self.tokenizer, self.image_size = plan, cfg, tokenizer, image_size
        self.pin_memory = device.type == "cuda"
        per_rank = cfg.num_streams // world_size
        self.streams = list(range(rank * per_rank, (rank + 1) * per_rank))
        self.states = [StreamState() for _ in range(cfg.num_streams)]
        self.totals: dict[int, dict[str, int]] = {}

    def __iter__(self) -> Iterator[Batch]:
        free = torch.ones(len(self.streams), POOL_SLOTS, dtype=torch.uint8).share_memory_()
        dataset = _WorkerStreams(self.plan, self.cfg, states={s: self.states[s] for s in self.streams},
                                 image_size=self.image_size, tokenizer=self.tokenizer, free=free)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.cfg.workers, pin_memory=self.pin_memory,
                            worker_init_fn=functools.partial(init_loader_worker, parent_pid=os.getpid()),
                            persistent_workers=False, prefetch_factor=2 if self.cfg.workers else None)
        parts = iter(loader)
        try:
            yield from self._batches(parts, free)
        finally:
            # Closing this generator shuts the workers down now (a sentinel each, then a join), not
            # whenever an exception's traceback lets the DataLoader iterator go: a rank on its way
            # out would otherwise wait for workers that wait for it.
            del parts

    def _batches(self, parts: Iterator, free: torch.Tensor) -> Iterator[Batch]:
        lent: list[tuple[int, int, StorageWeakRef]] = []  # (row of `free`, slot, the slot's storage)
        while True:
            lent = self._reclaim(lent, free)
            # Workers own streams round-robin and the DataLoader returns worker outputs
            # round-robin, so the next len(streams) items are exactly one step of every stream.
            subs = sorted((next(parts) for _ in self.streams), key=lambda sb: sb.stream)
            for sb in subs:
                self.states[sb.stream] = StreamState(**{k: v for k, v in sb.state.items() if k in STATE_FIELDS})
                self.totals[sb.stream] = sb.state["totals"]
                if sb.slot >= 0:
                    lent.append((self.streams.index(sb.stream), sb.slot, StorageWeakRef(sb.images.untyped_storage())))
            texts = torch.from_numpy(np.concatenate([sb.texts for sb in subs]))  # (B, L)
            jpegs = [(i * self.plan.sub_batch + row, jpeg) for i, sb in enumerate(subs) for row, jpeg in sb.jpegs]
            batch = Batch(image_parts=[sb.images for sb in subs], texts=texts.pin_memory() if self.pin_memory else texts,
                          keys=[k for sb in subs for k in sb.keys], jpegs=jpegs)
            del subs, sb  # only the batch's consumer keeps its buffers alive now
            yield batch
            del batch

    @staticmethod
    def _reclaim(lent: list[tuple[int, int, StorageWeakRef]], free: torch.Tensor,
                 ) -> list[tuple[int, int, StorageWeakRef]]:
        """Hand back to the workers the slots whose storage this process no longer references."""
        still_lent = []
        for row, slot, ref in lent:
            if ref.expired():
                free[row, slot] = 1
            else:
                still_lent.append((row, slot, ref))
        return still_lent

    def state_dict(self) -> dict[str, Any]:
        """This rank's view: its own streams are current, the others as last loaded."""
        streams = [{**dataclasses.asdict(st), "totals": self.totals.get(s, {})} for s, st in enumerate(self.states)]
        return {"version": STATE_VERSION, "resampled": self.cfg.resampled, "num_streams": self.cfg.num_streams,
                "streams": streams}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"checkpoint loader state has version {state.get('version')}, this clipscale "
                            f"reads version {STATE_VERSION}")
        for key in ("num_streams", "resampled"):
            if state[key] != getattr(self.cfg, key):
                raise DataError(f"checkpoint loader state has {key}={state[key]}, this launch has "
                                f"data.{key}={getattr(self.cfg, key)}; resume with data.{key}={json.dumps(state[key])}")
        self.states = [StreamState(**{k: v for k, v in st.items() if k in STATE_FIELDS}) for st in state["streams"]]
        self.totals = {s: st.get("totals", {}) for s, st in enumerate(state["streams"])}


def kill_loader_workers() -> None:
    """SIGKILL this process's DataLoader workers that outlived their loader's shutdown (stuck in a
    shard read), so that the interpreter's exit, which joins them, is bounded. They hold no state."""
    for worker in multiprocessing.active_children():
        worker.kill()
        worker.join()


def sum_counters(counters) -> dict[str, int]:
    total: collections.Counter = collections.Counter()
    for c in counters:
        total.update(c)
    return dict(total)


def merge_rank_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """The whole job's loader state from every rank's `state_dict()`: stream s from the rank owning it."""
    per_rank = states[0]["num_streams"] // len(states)
    return {**states[0], "streams": [states[s // per_rank]["streams"][s] for s in range(states[0]["num_streams"])]}


def build_train_loader(cfg: DataConfig, *, tokenizer: Callable, image_size: int, batch_size: int,
                       rank: int, world_size: int, seed: int, device: torch.device = CPU) -> TrainLoader:
    """Validate the shard spec and stream layout against the launch (as `check_data` did before the
    process group), then build the loader of batches for the training `device` (batches for a CUDA
    device arrive in pinned memory). Collective: rank 0 lists the shards and reads their sizes once,
    and every rank uses its list."""
    check_decode_device(cfg, device=device)
    sources, sizes = rank0_value(lambda: list_shards(cfg))
    urls = [u for source in sources for u in source]
    num_streams = resolve_layout(cfg, num_shards=len(urls), batch_size=batch_size, world_size=world_size)
    if rank == 0 and cfg.num_streams is None:
        log.info("data.num_streams=%d (unset by the recipe: it follows %d shards, world size %d x %d workers and the "
                 "global batch %d); set it to keep batches the same across launches", num_streams, len(urls),
                 world_size, max(cfg.workers, 1), batch_size * world_size)
    cfg = dataclasses.replace(cfg, num_streams=num_streams)
    weights = shard_weights(sources, cfg.train_weights, spec=cfg.train_shards)
    plan = StreamPlan(urls, sizes=sizes, weights=weights, cfg=cfg, sub_batch=batch_size * world_size // num_streams,
                      seed=seed)
    if rank == 0 and not cfg.resampled:
        quota, total = plan.quota(0) * num_streams, sum(sizes)
        log.info("exact epochs: %d streams x %d samples = %d of the %d samples of %d shards per epoch; the other %d "
                 "are left to later epochs (a stream's quota is the smallest stream's share, in whole sub-batches)",
                 num_streams, quota // num_streams, quota, total, len(urls), max(total - quota, 0))
    return TrainLoader(plan, cfg, tokenizer=tokenizer, image_size=image_size, rank=rank, world_size=world_size,
                       device=device)


def check_data(cfg: DataConfig, *, global_batch_size: int, world_size: int) -> int:
    """What `build_train_loader` checks of the data, without a process group: the shard spec (its
    first shards exist, their sizes are known), data.train_weights and the stream layout against the
    launch. Cheap enough for every rank to run before the process group starts, so that a bad spec
    fails at once on every rank. Returns data.num_streams, resolved when the recipe leaves it unset."""
    sources, _ = list_shards(cfg)
    return resolve_layout(cfg, num_shards=sum(map(len, sources)), batch_size=global_batch_size // world_size,
                          world_size=world_size)


def resolve_layout(cfg: DataConfig, *, num_shards: int, batch_size: int, world_size: int) -> int:
    """data.num_streams for this launch (`resolve_num_streams`), after data.train_weights is checked."""
    if cfg.train_weights and not cfg.resampled:
        raise DataError("data.train_weights needs data.resampled=true: exact epochs read every shard once")
    return resolve_num_streams(cfg, num_shards=num_shards, batch_size=batch_size, world_size=world_size)


def list_shards(cfg: DataConfig) -> tuple[list[list[str]], list[int]]:
    """(shard URLs per `::` source, samples per shard) of `data.train_shards`; the first shard of each
    source checked to exist."""
    sources = expand_sources(cfg.train_shards)
    check_first_shards(sources, spec=cfg.train_shards)
    return sources, shard_sizes(cfg, [u for source in sources for u in source])


def shard_sizes(cfg: DataConfig, urls: list[str]) -> list[int]:
    """Samples per shard: listed (sizes.json / _info.json), else `train_num_samples` spread evenly."""
    listed = read_sizes(urls)
    if listed is not None:
        return [listed[u] for u in urls]
    if cfg.resampled:
        return [1] * len(urls)
    if cfg.train_num_samples is None:
        raise DataError(f"no sizes.json or _info.json lists every shard of data.train_shards="
                        f"{cfg.train_shards!r}; set data.train_num_samples (samples in all those shards)")
    return [cfg.train_num_samples // len(urls)] * len(urls)


def check_decode_device(cfg: DataConfig, *, device: torch.device) -> None:
    """data.decode_device is "cpu", or "cuda" with a CUDA training device to decode on."""
    if cfg.decode_device not in ("cpu", "cuda"):
        raise DataError(f"data.decode_device={cfg.decode_device!r} must be 'cpu' or 'cuda'")
    if cfg.decode_device == "cuda" and device.type != "cuda":
        visible = "a CUDA device is visible" if torch.cuda.is_available() else "no CUDA device is visible"
        raise DataError(f"data.decode_device='cuda' decodes JPEGs on the training device, but this run trains on "
                        f"{device} ({visible}); set data.decode_device='cpu'")


def resolve_num_streams(cfg: DataConfig, *, num_shards: int, batch_size: int, world_size: int) -> int:
    """`data.num_streams`, checked against the launch and the data; when the recipe leaves it unset, the
    largest multiple of world size x workers, up to max(DEFAULT_STREAMS, world size x workers), that
    divides the global batch and (exact epochs) is at most the number of shards."""
    if cfg.num_streams is not None:
        check_layout(cfg, num_streams=cfg.num_streams, num_shards=num_shards, batch_size=batch_size,
                     world_size=world_size)
        return cfg.num_streams
    unit = world_size * max(cfg.workers, 1)
    limit = max(DEFAULT_STREAMS, unit) if cfg.resampled else min(max(DEFAULT_STREAMS, unit), num_shards)
    fits = [n for n in range(unit, limit + 1, unit) if batch_size * world_size % n == 0]
    if not fits:  # not even world size x workers fits: say why as for a recipe's value
        check_layout(cfg, num_streams=unit, num_shards=num_shards, batch_size=batch_size, world_size=world_size)
    return fits[-1]


def check_layout(cfg: DataConfig, *, num_streams: int, num_shards: int, batch_size: int, world_size: int) -> None:
    workers = max(cfg.workers, 1)
    if num_streams % (world_size * workers):
        raise DataError(
            f"data.num_streams={num_streams} must be a multiple of world size x data.workers = "
            f"{world_size} x {workers}; set data.num_streams to a multiple of {world_size * workers}"
        )
    if (batch_size * world_size) % num_streams:
        raise DataError(
            f"the global batch {batch_size * world_size} must be a multiple of data.num_streams="
            f"{num_streams}; change train.global_batch_size or data.num_streams"
        )
    if num_shards < num_streams and not cfg.resampled:
        raise DataError(
            f"data.train_shards has {num_shards} shards, fewer than data.num_streams={num_streams}; "
            f"lower data.num_streams, reshard into more shards or set data.resampled=true"
        )
