"""Loader benchmark: clipscale's training loader vs an open_clip_train-style webdataset pipeline vs the
single-core decode limit, measured side by side in one run.

    clipscale bench loader --workers 2 --out loader.json            # generates 4 shards of 384 px JPEGs
    clipscale bench loader --shards 'data/train/{000000..000007}.tar' --workers 2 --out loader.json
    python -m clipscale.bench.loader --workers 2 --out loader.json

Three measurements, run back to back (clipscale, reference, raw) `--repeats` times:
1. clipscale: `build_train_loader` with ViT-B-32's tokenizer, 224 px crops, one rank; uint8 batches
   (normalisation happens later, on the training device).
2. reference: what open_clip_train does per sample (PIL decode to RGB, `open_clip.image_transform(224,
   is_train=True)` to a normalised float tensor, tokenizer, `wds.batched`) in a webdataset pipeline
   inside a `DataLoader(batch_size=None, num_workers=N)`, same sample shuffle buffer as clipscale.
3. raw limit: `decode_crop` (the loader's decode + random resized crop, same scale) in a plain loop
   over image bytes already in memory, one thread: the most one core can do, with no pipeline.
Loader rates are counted after a warm-up of one batch per worker; per worker core = rate / workers.
"""
from __future__ import annotations

import argparse
import functools
import io
import logging
import os
import random
import resource
import statistics
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import open_clip
import torch
import webdataset as wds
from PIL import Image

from clipscale.bench import environment, write_json
from clipscale.data.config import DataConfig
from clipscale.data.decode import decode_crop
from clipscale.data.pipeline import build_train_loader
from clipscale.data.shards import IMAGE_EXTENSIONS, expand_sources, extension, open_shard, tar_members

log = logging.getLogger(__name__)
CROP_PX = 224  # ViT-B train transforms
TARGETS = {"clipscale_over_reference_per_core": 2.0, "clipscale_per_core_over_raw_limit": 0.8}
METHOD = (
    "clipscale: clipscale.data.pipeline.build_train_loader (exact epochs, num_streams = workers, one rank, "
    "ViT-B-32 tokenizer, 224 px random resized crop), batches are uint8 (normalisation happens on the device "
    "in the trainer). reference: webdataset SimpleShardList -> split_by_worker -> tarfile_to_samples -> "
    "shuffle -> per sample PIL decode .convert('RGB') + open_clip.image_transform(224, is_train=True) "
    "(float normalised) + tokenizer -> wds.batched, in DataLoader(batch_size=None, num_workers=N) whose "
    "workers run 1 torch thread. Both: samples/s after a warm-up of one batch per worker, per worker core = "
    "samples/s / workers. raw limit: clipscale.data.decode.decode_crop(size=224, scale as the loader) in a "
    "single-thread loop over image bytes held in memory (images/s on one core), no pipeline. "
    "other_processes_cpu_fraction: machine busy CPU time (/proc/stat) minus this process tree's (getrusage), "
    "over wall time x CPUs, during each measurement (start-up included); figures taken while it is high are "
    "skewed by other work on the machine."
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="clipscale bench loader", description=__doc__.splitlines()[0])
    p.add_argument("--shards", help="brace-expanded shard spec; default: generate shards in a temp dir")
    p.add_argument("--image-px", type=int, default=384, help="side of generated images")
    p.add_argument("--gen-shards", type=int, default=4, help="shards to generate (without --shards)")
    p.add_argument("--gen-per-shard", type=int, default=512, help="images per generated shard")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of both loaders")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--samples", type=int, default=2048, help="samples measured per loader (and raw decodes)")
    p.add_argument("--repeats", type=int, default=2, help="rounds of (clipscale, reference, raw)")
    p.add_argument("--out", help="JSON file to write")
    args = p.parse_args(argv)
    for name in ("image_px", "gen_shards", "gen_per_shard", "workers", "batch", "samples", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")
    if args.batch % args.workers:
        p.error(f"--batch={args.batch} must be a multiple of --workers={args.workers} (one clipscale stream "
                f"per worker); pick a batch divisible by the workers")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="clipscale-bench-loader-") as tmp:
        spec = args.shards or write_shards(Path(tmp), num_shards=args.gen_shards, per_shard=args.gen_per_shard,
                                           px=args.image_px)
        urls = [u for source in expand_sources(spec) for u in source]
        if len(urls) < args.workers:
            raise SystemExit(f"--shards {spec!r} has {len(urls)} shards, fewer than --workers={args.workers}: "
                             f"each worker needs a shard; use fewer workers or more shards")
        images, counts = read_images(urls, limit=args.samples)
        tokenizer = open_clip.get_tokenizer("ViT-B-32")
        rounds = [run_round(args, spec=spec, urls=urls, total_samples=sum(counts), images=images, tokenizer=tokenizer)
                  for _ in range(args.repeats)]
    payload = {"benchmark": "loader", "arguments": vars(args), "environment": environment(), "method": METHOD,
               "images": image_stats(images, counts=counts, generated=args.shards is None),
               "rounds": rounds, "summary": summarize(rounds)}
    print_table(payload)
    if args.out:
        write_json(args.out, payload)
    return 0


def _smooth_field(rng: np.random.Generator, *, cells: int, side: int) -> np.ndarray:
    """(side, side, 3) float32 Gaussian noise on a cells x cells grid, bicubically upsampled."""
    coarse = rng.standard_normal((cells, cells, 3), dtype=np.float32)
    return np.stack([np.asarray(Image.fromarray(coarse[..., c], mode="F").resize((side, side), Image.BICUBIC))
                     for c in range(3)], axis=-1)


def natural_jpeg(rng: np.random.Generator, *, px: int, noise: np.ndarray) -> bytes:
    """A px x px JPEG (quality 90) with photo-like statistics: smooth structure at three scales plus
    mild pixel noise; about 50 KB at 384 px. `noise`: (2 px, 2 px, 3) float32, sliced at random."""
    side = max(px // 4, 8)  # structure is built at 1/4 size; the upsampling keeps it smooth
    base = (128 + 60 * _smooth_field(rng, cells=3, side=side) + 30 * _smooth_field(rng, cells=8, side=side)
            + 30 * _smooth_field(rng, cells=24, side=side))
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).resize((px, px), Image.BICUBIC)
    top, left = rng.integers(0, px, size=2)
    pixels = np.asarray(img, dtype=np.float32) + 9 * noise[top:top + px, left:left + px]
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(directory: Path, *, num_shards: int, per_shard: int, px: int, seed: int = 0) -> str:
    """Write shards of `natural_jpeg` images with short captions (key.jpg, key.txt); returns the spec."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((2 * px, 2 * px, 3), dtype=np.float32)
    start = time.perf_counter()
    for shard in range(num_shards):
        with tarfile.open(directory / f"{shard:06d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{shard:06d}_{i:06d}"
                _add_member(tar, f"{key}.jpg", natural_jpeg(rng, px=px, noise=noise))
                _add_member(tar, f"{key}.txt", f"a photo of pattern {i % 97} in shard {shard}".encode())
    log.info("generated %d shards x %d images of %d px in %.1f s", num_shards, per_shard, px,
             time.perf_counter() - start)
    return str(directory / f"{{{0:06d}..{num_shards - 1:06d}}}.tar")


def read_images(urls: list[str], *, limit: int) -> tuple[list[bytes], list[int]]:
    """The first `limit` image members' bytes of the shards (paths or fsspec URLs), and images per shard."""
    images: list[bytes] = []
    counts = []
    for url in urls:
        reader = open_shard(url, timeout_s=DataConfig().read_timeout_s)
        try:
            members = tar_members(reader, select=lambda name: extension(name) in IMAGE_EXTENSIONS)
            count = 0
            for _, data in members:
                count += 1
                if len(images) < limit:
                    images.append(data)
        finally:
            reader.close()
        counts.append(count)
    if not images:
        raise SystemExit(f"no {'/'.join(IMAGE_EXTENSIONS)} member in {urls[0]} ...; check --shards")
    return images, counts


def image_stats(images: list[bytes], *, counts: list[int], generated: bool) -> dict[str, Any]:
    sizes = [Image.open(io.BytesIO(b)).size for b in images]
    return {"generated": generated, "shards": len(counts), "images_in_shards": sum(counts),
            "images_read": len(images), "mean_image_bytes": statistics.fmean(len(b) for b in images),
            "mean_width_px": statistics.fmean(s[0] for s in sizes),
            "mean_height_px": statistics.fmean(s[1] for s in sizes)}


def time_batches(batches: Iterator[int], *, warmup: int, samples: int) -> dict[str, float]:
    """Samples/s of an iterator of batch sizes: `warmup` batches untimed, then at least `samples`."""
    for _ in range(warmup):
        next(batches)
    seen, start = 0, time.perf_counter()
    while seen < samples:
        seen += next(batches)
    seconds = time.perf_counter() - start
    return {"samples": seen, "seconds": seconds, "samples_per_s": seen / seconds}


def clipscale_batches(spec: str, *, total_samples: int, workers: int, batch: int, tokenizer) -> Iterator[int]:
    """Batch sizes of clipscale's train loader (one rank, a stream per worker; images (B, 3, 224, 224) uint8
    in per-stream parts, which the trainer joins on its device)."""
    cfg = DataConfig(train_shards=spec, train_num_samples=total_samples, workers=workers, num_streams=workers)
    loader = build_train_loader(cfg, tokenizer=tokenizer, image_size=CROP_PX, batch_size=batch, rank=0,
                                world_size=1, seed=0)
    return (sum(len(part) for part in b.image_parts) for b in loader)


def reference_sample(sample: dict[str, Any], *, transform, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip_train's per-sample work: PIL decode to RGB, train transform, tokenise the caption."""
    data = next(sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample)
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return transform(image), tokenizer(sample["txt"].decode("utf-8"))[0]


def _has_image_and_caption(sample: dict[str, Any]) -> bool:
    return "txt" in sample and any(ext in sample for ext in IMAGE_EXTENSIONS)


def reference_batches(urls: list[str], *, workers: int, batch: int, tokenizer) -> Iterator[int]:
    """Batch sizes of the open_clip_train-style pipeline (images (B, 3, 224, 224) float32, normalised)."""
    transform = open_clip.image_transform(CROP_PX, is_train=True)
    work = functools.partial(reference_sample, transform=transform, tokenizer=tokenizer)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls), wds.split_by_worker, wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(DataConfig().shuffle_buffer), wds.select(_has_image_and_caption),
        wds.map(work, handler=wds.warn_and_continue), wds.batched(batch),
    ).repeat()
    loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=workers)
    return (images.shape[0] for images, _ in loader)


def raw_limit(images: list[bytes], *, samples: int, scale: tuple[float, float]) -> dict[str, float]:
    """Images/s of `decode_crop` on one thread over in-memory bytes (cycled to `samples` decodes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rng = random.Random(0)
        for data in images[:8]:  # warm-up: first-call allocations and kernel dispatch
            decode_crop(data, size=CROP_PX, rng=rng, scale=scale)
        start = time.perf_counter()
        for i in range(samples):
            decode_crop(images[i % len(images)], size=CROP_PX, rng=rng, scale=scale)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return {"samples": samples, "seconds": seconds, "samples_per_s": samples / seconds}


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has spent busy, CPU seconds of this process and its reaped children)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    own = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    return busy, sum(r.ru_utime + r.ru_stime for r in own)


def other_cpu_fraction(before: tuple[float, float], after: tuple[float, float], *, wall_s: float) -> float:
    """Share of the machine's CPU time that other processes used between two `cpu_seconds()`."""
    others = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, others) / (wall_s * (os.cpu_count() or 1))


def measure(name: str, run: Callable[[], dict[str, float]]) -> dict[str, float]:
    """`run()`'s figures plus how busy other processes kept the machine meanwhile (they skew every rate)."""
    before, start = cpu_seconds(), time.perf_counter()
    figures = run()
    figures["other_processes_cpu_fraction"] = other_cpu_fraction(before, cpu_seconds(),
                                                                 wall_s=time.perf_counter() - start)
    log.info("%s: %.1f samples/s (other processes used %.0f%% of the CPUs)", name, figures["samples_per_s"],
             100 * figures["other_processes_cpu_fraction"])
    return figures


def time_loader(batches: Iterator[int], *, args: argparse.Namespace) -> dict[str, float]:
    figures = time_batches(batches, warmup=args.workers, samples=args.samples)
    batches.close()  # shuts the DataLoader's workers down (and reaps them) before the next measurement
    return {**figures, "samples_per_s_per_core": figures["samples_per_s"] / args.workers}


def run_round(args: argparse.Namespace, *, spec: str, urls: list[str], total_samples: int, images: list[bytes],
              tokenizer) -> dict[str, Any]:
    """One (clipscale, reference, raw) measurement, back to back, with its ratios."""
    result = {
        "clipscale": measure("clipscale", lambda: time_loader(clipscale_batches(
            spec, total_samples=total_samples, workers=args.workers, batch=args.batch, tokenizer=tokenizer),
            args=args)),
        "reference": measure("reference", lambda: time_loader(reference_batches(
            urls, workers=args.workers, batch=args.batch, tokenizer=tokenizer), args=args)),
        "raw": measure("raw limit (one core)", lambda: raw_limit(
            images, samples=args.samples, scale=(DataConfig().crop_scale_min, 1.0))),
    }
    return {**result, "ratios": ratios(result)}


def ratios(result: dict[str, Any]) -> dict[str, float]:
    per_core = result["clipscale"]["samples_per_s_per_core"]
    return {"clipscale_over_reference_per_core": per_core / result["reference"]["samples_per_s_per_core"],
            "clipscale_per_core_over_raw_limit": per_core / result["raw"]["samples_per_s"]}


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over rounds of every rate and ratio; each ratio's target and whether the mean meets it."""
    rates = {f"{name}_{key}": statistics.fmean(r[name][key] for r in rounds)
             for name in ("clipscale", "reference") for key in ("samples_per_s", "samples_per_s_per_core")}
    rates["raw_limit_samples_per_s"] = statistics.fmean(r["raw"]["samples_per_s"] for r in rounds)
    means = {k: statistics.fmean(r["ratios"][k] for r in rounds) for k in TARGETS}
    targets = {k: {"value": means[k], "target": t, "met": means[k] >= t} for k, t in TARGETS.items()}
    return {**rates, "ratios": means, "targets": targets}


def print_table(payload: dict[str, Any]) -> None:
    """Human summary on stdout (CLI output)."""
    args, img = payload["arguments"], payload["images"]
    lines = [f"loader benchmark: {img['images_in_shards']} images in {img['shards']} shards, "
             f"{img['mean_width_px']:.0f}x{img['mean_height_px']:.0f} px, mean {img['mean_image_bytes'] / 1e3:.1f} KB; "
             f"workers={args['workers']} batch={args['batch']} samples={args['samples']}",
             f"{'round':>5} {'pipeline':<10} {'samples/s':>10} {'per core':>10} {'others':>7}  "
             f"(others: CPU share used by other processes meanwhile)"]
    for i, r in enumerate(payload["rounds"]):
        for name in ("clipscale", "reference"):
            rate, per_core = r[name]["samples_per_s"], r[name]["samples_per_s_per_core"]
            others = r[name]["other_processes_cpu_fraction"]
            lines.append(f"{i:>5} {name:<10} {rate:>10.1f} {per_core:>10.1f} {others:>7.0%}")
        lines.append(f"{i:>5} {'raw limit':<10} {'':>10} {r['raw']['samples_per_s']:>10.1f} "
                     f"{r['raw']['other_processes_cpu_fraction']:>7.0%}")
    for key, t in payload["summary"]["targets"].items():
        lines.append(f"{key}: {t['value']:.2f} (target >= {t['target']}: {'met' if t['met'] else 'NOT met'})")
    print("\n".join(lines))  # noqa: T201  (CLI output)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(main())
