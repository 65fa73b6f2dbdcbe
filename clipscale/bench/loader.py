"""Training loader throughput on your own shards: `clipscale bench loader --shards SPEC [data.KEY=VALUE ...]`.

    clipscale bench loader --shards 's3://bucket/laion/{00000..00999}.tar' --workers 8 --out loader.json
    clipscale bench loader --shards 'data/train/{000000..000007}.tar' data.shuffle_buffer=5000

Runs `build_train_loader` as training does on one rank (ViT-B-32 tokenizer, 224 px random resized
crops, one stream per worker, uint8 batches) and counts samples/s after a warm-up of one batch per
worker; per worker core = samples/s / workers. With `--device cuda` every batch is also joined on
the GPU (`Batch.images_on`, where `data.decode_device=cuda` decodes its JPEGs) and the time
includes that, as in training. Shards are drawn with replacement by default
(`data.resampled=true`), so no sample count is needed; any `data.*` override applies. The
comparison with other pipelines is `python -m benchmarks.loader` in the repository.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
from typing import Any, Iterator

import open_clip
import torch

from clipscale.bench import environment, measure, time_batches, write_json
from clipscale.config import load_config
from clipscale.data.config import DataConfig
from clipscale.data.pipeline import build_train_loader

log = logging.getLogger(__name__)
CROP_PX = 224  # ViT-B train transforms
DEFAULT_OVERRIDES = ("data.resampled=true",)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="clipscale bench loader", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="shards: a directory, a glob or a brace spec (path, fsspec URL, pipe:)")
    p.add_argument("overrides", nargs="*", help="data.KEY=VALUE overrides of the loader config")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (one stream each)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--samples", type=int, default=2048, help="samples timed per round")
    p.add_argument("--repeats", type=int, default=2, help="timed rounds")
    p.add_argument("--device", default="cpu", help="training device the batches are for: cpu, or cuda "
                   "(batches joined there; needed for data.decode_device=cuda)")
    p.add_argument("--out", help="JSON file to write")
    args = p.parse_args(argv)
    for name in ("workers", "batch", "samples", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name}={getattr(args, name)} must be at least 1")
    if args.batch % args.workers:
        p.error(f"--batch={args.batch} must be a multiple of --workers={args.workers} (one stream per worker); "
                f"pick a batch divisible by the workers")
    bad = [o for o in args.overrides if not o.startswith("data.")]
    if bad:
        p.error(f"{bad[0]!r}: only data.KEY=VALUE overrides apply to the loader")
    return args


def loader_config(shards: str, *, workers: int, overrides: list[str]) -> DataConfig:
    """The loader's config: defaults < `DEFAULT_OVERRIDES` < `overrides`, then the shards and one stream per worker."""
    data = load_config(None, [*DEFAULT_OVERRIDES, *overrides]).data
    return dataclasses.replace(data, train_shards=shards, workers=workers, num_streams=workers)


def loader_batches(cfg: DataConfig, *, batch: int, tokenizer, device: torch.device) -> Iterator[int]:
    """Batch sizes of clipscale's train loader on one rank. Images arrive in per-stream uint8 parts,
    which the trainer joins on its device: on CUDA that join (and any device JPEG decode) is timed too."""
    loader = build_train_loader(cfg, tokenizer=tokenizer, image_size=CROP_PX, batch_size=batch, rank=0,
                                world_size=1, seed=0, device=device)
    for b in loader:
        if device.type == "cuda":
            b.images_on(device)
            torch.cuda.synchronize(device)  # host sync: the batch is ready, as the step would need it
            yield b.texts.shape[0]
        else:
            yield sum(len(part) for part in b.image_parts)


def time_loader(batches: Iterator[int], *, workers: int, samples: int) -> dict[str, float]:
    """Samples/s of a multi-worker loader after one warm-up batch per worker, and per worker core."""
    try:
        figures = time_batches(batches, warmup=workers, samples=samples)
    finally:
        batches.close()  # shuts the DataLoader's workers down (and reaps them) before the next measurement
    return {**figures, "samples_per_s_per_core": figures["samples_per_s"] / workers}


def clipscale_rate(cfg: DataConfig, *, batch: int, samples: int, tokenizer,
                   device: torch.device = torch.device("cpu")) -> dict[str, float]:
    """One timed run of the train loader, with the CPU share other processes took meanwhile."""
    return measure(lambda: time_loader(loader_batches(cfg, batch=batch, tokenizer=tokenizer, device=device),
                                       workers=cfg.workers, samples=samples))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = loader_config(args.shards, workers=args.workers, overrides=args.overrides)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    rounds = []
    for i in range(args.repeats):
        rounds.append(clipscale_rate(cfg, batch=args.batch, samples=args.samples, tokenizer=tokenizer,
                                     device=torch.device(args.device)))
        log.info("round %d: %.1f samples/s, %.1f per worker core (other processes used %.0f%% of the CPUs)", i,
                 rounds[-1]["samples_per_s"], rounds[-1]["samples_per_s_per_core"],
                 100 * rounds[-1]["other_processes_cpu_fraction"])
    summary = {key: statistics.fmean(r[key] for r in rounds) for key in ("samples_per_s", "samples_per_s_per_core")}
    payload: dict[str, Any] = {"benchmark": "loader", "arguments": vars(args), "environment": environment(),
                               "data": dataclasses.asdict(cfg), "rounds": rounds, "summary": summary}
    print(f"clipscale loader: {summary['samples_per_s']:.1f} samples/s, "  # noqa: T201  (CLI output)
          f"{summary['samples_per_s_per_core']:.1f} per worker core ({args.workers} workers, batch {args.batch})")
    if args.out:
        write_json(args.out, payload)
    return 0
