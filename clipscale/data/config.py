"""Configuration of the training data stream (owned by clipscale.data)."""
from __future__ import annotations

import dataclasses
from typing import Literal


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    train_shards: str = "data/synthetic/train/{000000..000007}.tar"
    """Shard spec: path or fsspec URL with brace expansion; several sources joined by `::`."""
    train_num_samples: int | None = None
    """Samples per (virtual) epoch; default: read from sizes.json next to the shards."""
    resampled: bool = False
    """Draw shards with replacement (no epochs) instead of exact shuffled epochs."""
    num_streams: int = 4
    """Logical data streams; fixed per run so batches do not depend on world size or workers.
    Must be a multiple of world size x workers and divide the global batch."""
    workers: int = 1
    """DataLoader worker processes per rank."""
    shuffle_buffer: int = 1_000
    """Sample-level shuffle buffer size per worker (0 = no shuffling)."""
    caption_key: str = "txt"
    """Member extension holding the caption (`txt`), or `json:FIELD` for a field of key.json."""
    crop_scale_min: float = 0.9
    """Lower bound of RandomResizedCrop's area fraction (open_clip's default 0.9)."""
