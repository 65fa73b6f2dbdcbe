"""Safe, fast image decoding with the random-resized-crop done at decode time.

Only image bytes are decoded (never pickles). JPEGs are decoded at reduced size when the crop
allows it (libjpeg DCT scaling via `Image.draft`), then the crop box is resized once.
"""
from __future__ import annotations

import io
import math
import warnings

import numpy as np
from PIL import Image

MAX_IMAGE_PIXELS = 64_000_000  # larger images are treated as decompression bombs and skipped
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator, *,
                            scale: tuple[float, float], ratio: tuple[float, float] = (3 / 4, 4 / 3)
                            ) -> tuple[int, int, int, int]:
    """Crop box (left, top, right, bottom) with RandomResizedCrop's distribution (Szegedy et al. 2015).

    Area fraction uniform in `scale`, log aspect ratio uniform in `ratio`; after 10 failed tries,
    a centre crop clamped to `ratio` (the same fallback as torchvision).
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def decode_crop(data: bytes, *, size: int, rng: np.random.Generator, scale: tuple[float, float]) -> np.ndarray:
    """Image bytes -> uint8 array (3, size, size) of a random resized crop. Raises on bad images."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
        width, height = img.size
        box = random_resized_crop_box(width, height, rng, scale=scale)
        crop_min = min(box[2] - box[0], box[3] - box[1])
        if img.format == "JPEG" and crop_min >= 2 * size:
            # Decode at 1/2, 1/4 or 1/8 size when the crop stays at least `size` px wide.
            img.draft("RGB", (math.ceil(width * size / crop_min), math.ceil(height * size / crop_min)))
            fx, fy = img.size[0] / width, img.size[1] / height
            box = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
        img = img.convert("RGB")
        img = img.resize((size, size), Image.BICUBIC, box=box)
    return np.asarray(img).transpose(2, 0, 1)
