"""Benchmark shards with photo-like images and captions.

    python -m benchmarks.shards --set realistic --shards 4 --per-shard 256 --out data/bench_realistic

uniform: 384 px square JPEGs (quality 90, ~50 KB) with short captions, the web-photo average.
realistic: the spread a web crawl has: longest side 64-2,000 px (log-uniform), aspect ratio 1:4-4:1
(log-triangular around 1:1), ~10% PNG, ~5% WebP, the rest JPEG at quality 60-95, captions of 5-70 words.
Content is smooth structure at three scales plus mild pixel noise, which compresses like photos.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import math
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)
SETS = ("uniform", "realistic")
UNIFORM_PX = 384
MIN_SIDE, MAX_SIDE, MAX_ASPECT = 64, 2000, 4.0
FORMATS = (("PNG", 0.10), ("WEBP", 0.05))  # the rest is JPEG
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
WORDS = ("a the of in on with and photo picture view close up old new small large red blue green white black "
         "yellow brown wooden stone glass metal city street house garden park beach mountain river lake forest "
         "field road bridge tower church market table chair window door wall floor kitchen room bed dog cat "
         "horse bird cow sheep flowers tree trees grass sky clouds sunset night winter summer autumn spring "
         "snow rain people man woman child children family group friends wedding party dinner food plate cake "
         "coffee car bus train bike boat ship plane vintage modern abstract pattern texture illustration "
         "drawing poster logo design art painting portrait landscape aerial interior exterior detail sale "
         "shirt dress shoes bag watch phone book set pack best free high quality cheap style home").split()


def _smooth_field(rng: np.random.Generator, *, cells: int, height: int, width: int) -> np.ndarray:
    """(height, width, 3) float32 Gaussian noise on a coarse grid, bicubically upsampled."""
    coarse = rng.standard_normal((cells, cells, 3), dtype=np.float32)
    return np.stack([np.asarray(Image.fromarray(coarse[..., c], mode="F").resize((width, height), Image.BICUBIC))
                     for c in range(3)], axis=-1)


def photo_pixels(rng: np.random.Generator, *, width: int, height: int, noise: np.ndarray) -> np.ndarray:
    """(height, width, 3) uint8 with photo-like statistics. `noise`: (N, N, 3) float32 with N >= the
    longest side, sliced at random (drawing fresh noise per image would dominate generation time)."""
    w, h = max(width // 4, 8), max(height // 4, 8)  # structure is built at 1/4 size; upsampling keeps it smooth
    base = sum(amp * _smooth_field(rng, cells=cells, height=h, width=w) for amp, cells in ((60, 3), (30, 8), (30, 24)))
    img = Image.fromarray(np.clip(128 + base, 0, 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    top = rng.integers(0, noise.shape[0] - height + 1)
    left = rng.integers(0, noise.shape[1] - width + 1)
    pixels = np.asarray(img, dtype=np.float32) + 9 * noise[top:top + height, left:left + width]
    return np.clip(pixels, 0, 255).astype(np.uint8)


def encode(pixels: np.ndarray, fmt: str, *, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt, **({"quality": quality} if fmt in ("JPEG", "WEBP") else {}))
    return buf.getvalue()


def realistic_shape(rng: np.random.Generator) -> tuple[int, int]:
    """(width, height): longest side log-uniform in [64, 2000], aspect log-triangular in [1:4, 4:1]."""
    longest = math.exp(rng.uniform(math.log(MIN_SIDE), math.log(MAX_SIDE)))
    aspect = math.exp(rng.triangular(-math.log(MAX_ASPECT), 0.0, math.log(MAX_ASPECT)))  # width / height
    short = max(1, round(longest / max(aspect, 1 / aspect)))
    return (round(longest), short) if aspect >= 1 else (short, round(longest))


def realistic_format(rng: np.random.Generator) -> str:
    draw, edge = rng.random(), 0.0
    for fmt, share in FORMATS:
        edge += share
        if draw < edge:
            return fmt
    return "JPEG"


def caption(rng: np.random.Generator, *, words: int) -> str:
    return " ".join(rng.choice(WORDS, size=words))


def sample(rng: np.random.Generator, *, kind: str, noise: np.ndarray) -> tuple[str, bytes, str]:
    """(extension, image bytes, caption) of one sample of shard set `kind`."""
    if kind == "uniform":
        pixels = photo_pixels(rng, width=UNIFORM_PX, height=UNIFORM_PX, noise=noise)
        return "jpg", encode(pixels, "JPEG"), caption(rng, words=int(rng.integers(5, 13)))
    width, height = realistic_shape(rng)
    fmt = realistic_format(rng)
    data = encode(photo_pixels(rng, width=width, height=height, noise=noise), fmt, quality=int(rng.integers(60, 96)))
    return EXTENSIONS[fmt], data, caption(rng, words=int(rng.integers(5, 71)))


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(directory: Path, *, kind: str, num_shards: int, per_shard: int, seed: int = 0) -> str:
    """Write `num_shards` tars of `per_shard` samples (key.EXT image, key.txt caption) and sizes.json
    into `directory`; returns the brace spec."""
    if kind not in SETS:
        raise ValueError(f"shard set {kind!r} is not one of {', '.join(SETS)}")
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    side = 2 * UNIFORM_PX if kind == "uniform" else MAX_SIDE + 512  # room for random offsets
    noise = rng.standard_normal((side, side, 3), dtype=np.float32)
    start = time.perf_counter()
    for shard in range(num_shards):
        with tarfile.open(directory / f"{shard:06d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{shard:06d}_{i:06d}"
                ext, image, text = sample(rng, kind=kind, noise=noise)
                _add_member(tar, f"{key}.{ext}", image)
                _add_member(tar, f"{key}.txt", text.encode())
    (directory / "sizes.json").write_text(json.dumps({f"{s:06d}.tar": per_shard for s in range(num_shards)}))
    log.info("generated %s shards: %d x %d samples in %.1f s", kind, num_shards, per_shard,
             time.perf_counter() - start)
    return str(directory / f"{{{0:06d}..{num_shards - 1:06d}}}.tar")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.shards", description=__doc__.splitlines()[0])
    p.add_argument("--set", choices=SETS, default="uniform")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--per-shard", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="directory to write the shards into")
    args = p.parse_args(argv)
    if args.shards < 1 or args.per_shard < 1:
        p.error(f"--shards={args.shards} and --per-shard={args.per_shard} must be at least 1")
    print(write_shards(Path(args.out), kind=args.set, num_shards=args.shards, per_shard=args.per_shard,  # noqa: T201
                       seed=args.seed))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(main())
