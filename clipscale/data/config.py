"""Configuration of the training data stream (owned by clipscale.data)."""
from __future__ import annotations

import dataclasses
import re

GENERIC_DIRS = ("train", "training", "shards", "tars", "wds", "webdataset", "data")



@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    train_shards: str = "data/synthetic/train/{000000..000007}.tar"
    """Shard spec: path, fsspec URL or `pipe:COMMAND`, brace-expanded; several sources joined by `::`."""
    name: str | None = None
    """Upstream dataset name, the results table's `dataset` (None: the shards' directory name, see
    `dataset_name`)."""
    train_weights: tuple[float, ...] | None = None
    """Sampling weight of each `::` source, per shard (resampled mode only); default: all 1."""
    train_num_samples: int | None = None
    """Samples in the shards, when neither sizes.json nor _info.json lists them (exact epochs only)."""
    resampled: bool = False
    """Draw shards with replacement (no epochs) instead of exact shuffled epochs."""
    num_streams: int | None = None
    """Logical data streams; set it to keep batches the same whatever the world size or workers. Must be
    a multiple of world size x workers, divide the global batch and (exact epochs) not exceed the shards.
    Unset: the largest such count up to max(4, world size x workers), logged at start-up."""
    workers: int = 1
    """DataLoader worker processes per rank."""
    shuffle_buffer: int = 1_000
    """Sample shuffle buffer per stream (0 = no shuffling); it spans one block of shards."""
    shuffle_buffer_mb: float = 256.0
    """Most megabytes (10^6 bytes) of raw image + caption bytes one stream's shuffle buffer holds,
    whatever the samples' sizes (a rank holds up to num_streams / world size buffers)."""
    block_shards: int = 4
    """Shards per shuffle block: a resume re-reads (without decoding) at most this many shards."""
    caption_key: str = "txt"
    """Member extension holding the caption (`txt`), or `json:FIELD` for a field of key.json."""
    decode_device: str = "cpu"
    """Where JPEGs are decoded: "cpu" (dataloader workers) or "cuda" (the training GPU, nvJPEG; workers
    then only read the JPEG's header and draw its crop, and other formats stay on the CPU)."""
    crop_scale_min: float = 0.9
    """Lower bound of RandomResizedCrop's area fraction (open_clip's default 0.9)."""
    max_bad_fraction: float = 0.2
    """Stop with an error when more than this fraction of a stream's samples is bad."""
    shard_retries: int = 3
    """Extra attempts to read a shard that fails or stalls, with exponential backoff, before skipping it."""
    retry_backoff_s: float = 2.0
    """Wait before the first retry; doubled for each further one."""
    read_timeout_s: float = 120.0
    """A shard that delivers no bytes for this long counts as stalled."""
    max_failed_shards: int = 16
    """Stop with an error when this many shards in a row cannot be read."""

    @property
    def dataset_name(self) -> str:
        """`name`, or the name of the directory holding each `::` source's shards, skipping generic ones
        (data/laion400m/{00000..41407}.tar -> laion400m; data/synthetic/train/{0..7}.tar -> synthetic)."""
        return self.name or default_dataset_name(self.train_shards)


def default_dataset_name(spec: str) -> str:
    """The dataset name a shard spec suggests: see `DataConfig.dataset_name`; sources joined by `+`."""
    names = []
    for source in spec.split("::"):
        if source.startswith("pipe:"):  # pipe:COMMAND ... URL: the last word with a path in it
            source = next((word for word in reversed(source.split()) if "/" in word), source)
        folders = [part for part in re.split(r"/+", source)[:-1] if part and not part.endswith(":")]
        while len(folders) > 1 and folders[-1].lower() in GENERIC_DIRS:
            folders.pop()
        names.append(folders[-1] if folders else source)
    return "+".join(dict.fromkeys(names))
