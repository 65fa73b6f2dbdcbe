"""Loader comparison: clipscale's train loader vs open_clip_train's real data pipeline vs webdataset's
pipeline feeding clipscale's decode, with the single-core decode limit, side by side in one run.

    python -m benchmarks.loader --shard-set both --workers 2 --samples 1024 --repeats 2 --out loader.json
    python -m benchmarks.loader --shards 'data/train/{000000..000007}.tar' --out loader.json

Per round, back to back on the same shards, each multi-worker loader with `--workers` DataLoader
workers, counted after a warm-up of one batch per worker (per worker core = samples/s / workers):
1. clipscale: `build_train_loader` (`clipscale bench loader`), exact epochs, one stream per worker.
2. open_clip_train: `open_clip_train.data.get_wds_dataset` as installed with open_clip_torch, run in a
   subprocess on webdataset 0.2.86 (it fails on webdataset >= 0.2.100), which this benchmark installs
   once into a throwaway directory under `--cache-dir`. PIL decode, float normalised 224 px tensors.
3. webdataset + decode_crop: webdataset's own stream layer (shard list, split by worker,
   `tarfile_to_samples`, shuffle, batched) with clipscale's per-sample work (`decode_crop` + tokenizer):
   the difference to (1) is the cost of the stream layer.
4. raw limit: `decode_crop` in a single-thread loop over image bytes held in memory (read with `tarfile`).
"""
from __future__ import annotations

import argparse
import functools
import io
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import fsspec
import open_clip
import torch
import webdataset as wds
from PIL import Image

from benchmarks.memory import REPO
from benchmarks.shards import SETS, write_shards
from clipscale.bench import environment, measure, write_json
from clipscale.bench.loader import CROP_PX, clipscale_rate, time_loader
from clipscale.data.config import DataConfig
from clipscale.data.decode import decode_crop
from clipscale.data.shards import IMAGE_EXTENSIONS, expand_sources

log = logging.getLogger(__name__)
PIPELINES = ("clipscale", "open_clip_train", "wds_decode_crop")
OPEN_CLIP_TRAIN_WEBDATASET = "0.2.86"
# What open_clip_train.data imports beyond clipscale's own dependencies (open_clip_torch's training extra).
OPEN_CLIP_TRAIN_EXTRAS = ("pandas", "python-dateutil", "pytz", "tzdata", "six")
TARGETS = {"clipscale_over_open_clip_train_per_core": 2.0, "clipscale_per_core_over_raw_limit": 0.8}
SCALE = (DataConfig().crop_scale_min, 1.0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loader", description=__doc__.splitlines()[0])
    p.add_argument("--shard-set", choices=(*SETS, "both"), default="both", help="generated shards to measure on")
    p.add_argument("--shards", help="measure on these shards (brace spec) instead of generated ones")
    p.add_argument("--gen-shards", type=int, default=4, help="shards to generate per set")
    p.add_argument("--gen-per-shard", type=int, default=256, help="samples per generated shard")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of every loader")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--samples", type=int, default=1024, help="samples timed per measurement")
    p.add_argument("--repeats", type=int, default=2, help="rounds of the four measurements")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "clipscale-bench"),
                   help="where the throwaway webdataset for open_clip_train is installed (once)")
    p.add_argument("--out", help="JSON file to write")
    args = p.parse_args(argv)
    for name in ("gen_shards", "gen_per_shard", "workers", "batch", "samples", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")
    if args.batch % args.workers:
        p.error(f"--batch={args.batch} must be a multiple of --workers={args.workers} (one clipscale stream "
                f"per worker); pick a batch divisible by the workers")
    if args.gen_shards < args.workers:
        p.error(f"--gen-shards={args.gen_shards} is fewer than --workers={args.workers}: each worker needs a shard")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = open_clip_train_env(Path(args.cache_dir))
    sets = {}
    with tempfile.TemporaryDirectory(prefix="clipscale-bench-loader-") as tmp:
        names = ["given"] if args.shards else list(SETS) if args.shard_set == "both" else [args.shard_set]
        for name in names:
            spec = args.shards or write_shards(Path(tmp) / name, kind=name, num_shards=args.gen_shards,
                                               per_shard=args.gen_per_shard)
            sets[name] = measure_set(args, spec=spec, env=env)
    payload = {"benchmark": "loader_comparison", "arguments": vars(args), "environment": environment(),
               "open_clip_train_env": env, "method": __doc__, "sets": sets}
    print_table(payload)
    if args.out:
        write_json(args.out, payload)
    return 0


def open_clip_train_env(cache_dir: Path) -> dict[str, Any]:
    """A PYTHONPATH under which `open_clip_train.data` imports with webdataset 0.2.86 first, installed
    once into `cache_dir` with pip (`--target`, so clipscale's environment is untouched); or the error."""
    target = cache_dir / f"open_clip_train-webdataset-{OPEN_CLIP_TRAIN_WEBDATASET}"
    env = {"pythonpath": str(target), "webdataset": OPEN_CLIP_TRAIN_WEBDATASET}
    if not (target / "webdataset").is_dir():
        log.info("installing webdataset==%s into %s (a throwaway directory for open_clip_train only)",
                 OPEN_CLIP_TRAIN_WEBDATASET, target)
        env["installed"] = [f"webdataset=={OPEN_CLIP_TRAIN_WEBDATASET}"]
        error = _pip_target(target, env["installed"])
        if error:
            return {**env, "error": error}
    error = _probe(target)
    if error:  # open_clip_torch without its training extra: add what open_clip_train.data imports
        log.info("open_clip_train does not import (%s); installing %s into %s", error.splitlines()[-1],
                 " ".join(OPEN_CLIP_TRAIN_EXTRAS), target)
        env["installed"] = [*env.get("installed", []), *OPEN_CLIP_TRAIN_EXTRAS]
        error = _pip_target(target, list(OPEN_CLIP_TRAIN_EXTRAS)) or _probe(target)
    return {**env, "error": error} if error else env


def _pip_target(target: Path, packages: list[str]) -> str | None:
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                           *packages], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"pip install --target {target} {' '.join(packages)}: {proc.stderr[-1500:]}"
    return None


def _probe(target: Path) -> str | None:
    code = "import open_clip_train.data, webdataset, sys; sys.exit(webdataset.__version__ != sys.argv[1])"
    proc = subprocess.run([sys.executable, "-c", code, OPEN_CLIP_TRAIN_WEBDATASET], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(target)), cwd=REPO)
    if proc.returncode != 0:
        return f"open_clip_train.data with {target}: {proc.stderr.strip()[-1500:] or 'wrong webdataset version'}"
    return None


def measure_set(args: argparse.Namespace, *, spec: str, env: dict[str, Any]) -> dict[str, Any]:
    urls = [u for source in expand_sources(spec) for u in source]
    if len(urls) < args.workers:
        raise SystemExit(f"--shards {spec!r} has {len(urls)} shards, fewer than --workers={args.workers}: "
                         f"each worker needs a shard; use fewer workers or more shards")
    shard_images = read_images(urls, limit=args.samples)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    cfg = DataConfig(train_shards=spec, train_num_samples=shard_images["total"], workers=args.workers,
                     num_streams=args.workers)
    rounds = []
    for i in range(args.repeats):
        result = {
            "clipscale": clipscale_rate(cfg, batch=args.batch, samples=args.samples, tokenizer=tokenizer),
            "open_clip_train": measure(lambda: open_clip_train_rate(args, spec=spec, total=shard_images["total"],
                                                                    env=env)),
            "wds_decode_crop": measure(lambda: time_loader(wds_batches(urls, batch=args.batch, workers=args.workers,
                                                                       tokenizer=tokenizer),
                                                           workers=args.workers, samples=args.samples)),
            "raw": measure(lambda: raw_limit(shard_images["images"], samples=args.samples)),
        }
        rounds.append({**result, "ratios": ratios(result)})
        log.info("round %d: %s", i, {k: round(v, 3) for k, v in rounds[-1]["ratios"].items() if v is not None})
    return {"spec": spec, "images": image_stats(shard_images, generated=args.shards is None), "rounds": rounds,
            "summary": summarize(rounds)}


def read_images(urls: list[str], *, limit: int) -> dict[str, Any]:
    """The first `limit` images' bytes and captions of the shards (stdlib `tarfile`), and the sample total."""
    images, captions, total = [], [], 0
    for url in urls:
        with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                ext = member.name.rsplit(".", 1)[-1].lower()
                if not member.isfile() or ext not in (*IMAGE_EXTENSIONS, "txt"):
                    continue
                total += ext != "txt"
                if ext == "txt" and len(captions) < limit:
                    captions.append(tar.extractfile(member).read().decode("utf-8"))
                elif ext != "txt" and len(images) < limit:
                    images.append((ext, tar.extractfile(member).read()))
    if not images:
        raise SystemExit(f"no {'/'.join(IMAGE_EXTENSIONS)} member in {urls[0]} ...; check --shards")
    return {"images": [data for _, data in images], "formats": [ext for ext, _ in images], "captions": captions,
            "total": total}


def image_stats(shard_images: dict[str, Any], *, generated: bool) -> dict[str, Any]:
    """Sizes, formats and caption lengths of the images the raw limit decodes (the first `--samples`)."""
    images = shard_images["images"]
    sizes = [Image.open(io.BytesIO(b)).size for b in images]
    formats = shard_images["formats"]
    return {"generated": generated, "samples_in_shards": shard_images["total"], "images_read": len(images),
            "mean_image_kb": statistics.fmean(len(b) for b in images) / 1e3,
            "mean_megapixels": statistics.fmean(w * h for w, h in sizes) / 1e6,
            "longest_side_px": {"min": min(max(s) for s in sizes), "median": statistics.median(max(s) for s in sizes),
                                "max": max(max(s) for s in sizes)},
            "format_share": {ext: formats.count(ext) / len(formats) for ext in sorted(set(formats))},
            "mean_caption_words": statistics.fmean(len(c.split()) for c in shard_images["captions"] or [""])}


def open_clip_train_rate(args: argparse.Namespace, *, spec: str, total: int, env: dict[str, Any]) -> dict[str, Any]:
    """open_clip_train's pipeline in a subprocess on its webdataset (start-up not timed); or why it is unavailable."""
    if "error" in env:
        return {"unavailable": env["error"]}
    case = {"shards": spec, "num_samples": total, "batch": args.batch, "workers": args.workers,
            "samples": args.samples, "image_size": CROP_PX}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.open_clip_train_loader", "--case", json.dumps(case)],
                          capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=env["pythonpath"], OMP_NUM_THREADS="1"))
    if proc.returncode != 0:
        return {"unavailable": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def wds_sample(sample: dict[str, Any], *, tokenizer, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """clipscale's per-sample work on a webdataset sample: `decode_crop` to uint8, tokenise the caption."""
    data = next(sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample)
    image = torch.from_numpy(decode_crop(data, size=CROP_PX, rng=rng, scale=SCALE))
    return image, tokenizer(sample["txt"].decode("utf-8"))[0]


def _has_image_and_caption(sample: dict[str, Any]) -> bool:
    return "txt" in sample and any(ext in sample for ext in IMAGE_EXTENSIONS)


def wds_batches(urls: list[str], *, batch: int, workers: int, tokenizer) -> Iterator[int]:
    """Batch sizes of webdataset's stream layer feeding clipscale's decode (uint8 (B, 224, 224, 3) batches)."""
    work = functools.partial(wds_sample, tokenizer=tokenizer, rng=random.Random(0))
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls), wds.split_by_worker, wds.tarfile_to_samples(handler=wds.warn_and_continue),
        wds.shuffle(DataConfig().shuffle_buffer), wds.select(_has_image_and_caption),
        wds.map(work, handler=wds.warn_and_continue), wds.batched(batch),
    ).repeat()
    loader = torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=workers)
    return (images.shape[0] for images, _ in loader)


def raw_limit(images: list[bytes], *, samples: int) -> dict[str, float]:
    """Images/s of `decode_crop` on one thread over in-memory bytes (cycled to `samples` decodes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rng = random.Random(0)
        for data in images[:8]:  # warm-up: first-call allocations and kernel dispatch
            decode_crop(data, size=CROP_PX, rng=rng, scale=SCALE)
        start = time.perf_counter()
        for i in range(samples):
            decode_crop(images[i % len(images)], size=CROP_PX, rng=rng, scale=SCALE)
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return {"samples": samples, "seconds": seconds, "samples_per_s": samples / seconds}


def ratios(result: dict[str, Any]) -> dict[str, float | None]:
    """Per-core ratios between the pipelines and to the raw limit; None where open_clip_train is unavailable."""
    per_core = {name: result[name].get("samples_per_s_per_core") for name in PIPELINES}
    raw = result["raw"]["samples_per_s"]
    oct_ = per_core["open_clip_train"]
    return {"clipscale_over_open_clip_train_per_core": per_core["clipscale"] / oct_ if oct_ else None,
            "clipscale_over_wds_decode_crop_per_core": per_core["clipscale"] / per_core["wds_decode_crop"],
            "clipscale_per_core_over_raw_limit": per_core["clipscale"] / raw,
            "wds_decode_crop_per_core_over_raw_limit": per_core["wds_decode_crop"] / raw,
            "open_clip_train_per_core_over_raw_limit": oct_ / raw if oct_ else None}


def _mean(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else statistics.fmean(values)


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over rounds of every per-core rate and ratio; each target ratio and whether its mean meets it."""
    rates = {f"{name}_samples_per_s_per_core": _mean([r[name].get("samples_per_s_per_core") for r in rounds])
             for name in PIPELINES}
    rates["raw_limit_samples_per_s"] = _mean([r["raw"]["samples_per_s"] for r in rounds])
    means = {k: _mean([r["ratios"][k] for r in rounds]) for k in rounds[0]["ratios"]}
    targets = {k: {"value": means[k], "target": t, "met": means[k] is not None and means[k] >= t}
               for k, t in TARGETS.items()}
    return {**rates, "ratios": means, "targets": targets}


def print_table(payload: dict[str, Any]) -> None:
    """Human summary on stdout (CLI output)."""
    args = payload["arguments"]
    lines = [f"loader comparison: workers={args['workers']} batch={args['batch']} samples={args['samples']}"]
    for name, s in payload["sets"].items():
        img = s["images"]
        lines.append(f"[{name}] {img['samples_in_shards']} samples, mean {img['mean_megapixels']:.2f} MP, "
                     f"{img['mean_image_kb']:.0f} KB, formats {img['format_share']}")
        lines.append(f"{'round':>5} {'pipeline':<16} {'per core/s':>10} {'others':>7}")
        for i, r in enumerate(s["rounds"]):
            for key in (*PIPELINES, "raw"):
                rate = r[key].get("samples_per_s_per_core", r[key].get("samples_per_s"))
                shown = f"{rate:>10.1f}" if rate else f"{'n/a':>10}"
                lines.append(f"{i:>5} {key:<16} {shown} {r[key]['other_processes_cpu_fraction']:>7.0%}")
        for key, value in s["summary"]["ratios"].items():
            lines.append(f"  {key}: {'n/a' if value is None else f'{value:.2f}'}")
    print("\n".join(lines))  # noqa: T201  (CLI output)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(main())
