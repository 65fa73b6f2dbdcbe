"""Gradient-cache benchmark: step-time overhead vs a plain step, and peak memory vs global batch.

    python -m benchmarks.gradcache --out gradcache.json --time-batch 128 --batches 64 128 256 512 \\
        --chunk-size 32

Time: plain, chunk-accumulated and gradient-cached steps alternate in one process on the same
batch (median of `--steps` each), so their ratios are measured under the same machine load. Memory: each (mode,
batch) runs in a fresh subprocess (see `benchmarks.memory`); "extra" is the peak above the steady
state after a warm-up step (model, gradients, inputs allocated), "total" the process peak; on CPU
also "extra_tensor" (live tensor bytes, which malloc's fragmentation does not inflate).
Model: a small open_clip ViT CLIP with dropout and patch dropout (`--width`, `--layers`, ...).
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from typing import Any

import torch

from benchmarks.memory import (METHOD_CPU, METHOD_CUDA, peak_rss_bytes, peak_tensor_bytes, reset_peak_rss,
                               rss_bytes, run_isolated)
from clipscale.bench import environment, write_json
from clipscale.gradcache import gradcache_step
from clipscale.loss import LossConfig, contrastive_loss
from tests.models import tiny_clip

log = logging.getLogger(__name__)
MODEL_KEYS = ("width", "layers", "head_width", "embed_dim", "image_size", "patch_size", "context_length")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gradcache", description=__doc__.splitlines()[0])
    p.add_argument("--out", help="JSON file to write")
    p.add_argument("--time-batch", type=int, default=128, help="batch of the plain-vs-gradcache timing")
    p.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256, 512], help="memory sweep")
    p.add_argument("--chunk-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode (median)")
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--head-width", type=int, default=16, help="attention head width (ViT-B: 64)")
    p.add_argument("--embed-dim", type=int, default=256)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--context-length", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: one memory case in this process
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.case:
        print(json.dumps(memory_case(json.loads(args.case))))  # noqa: T201  (CLI output, read by the parent)
        return 0
    if not args.out:
        raise SystemExit("--out FILE.json is required")
    model_cfg = {key: getattr(args, key) for key in MODEL_KEYS}
    timing = time_steps(model_cfg, batch=args.time_batch, chunk_size=args.chunk_size, steps=args.steps,
                        device=torch.device(args.device))
    log.info("timing %s", timing)
    memory = []
    for mode in ("gradcache", "plain"):
        for batch in args.batches:
            case = {"mode": mode, "batch": batch, "chunk_size": args.chunk_size, "device": args.device, **model_cfg}
            memory.append(run_isolated("benchmarks.gradcache", case))
            log.info("memory %s", memory[-1])
    write_json(args.out, {"benchmark": "gradcache", "model": model_cfg, "environment": environment(),
                          "memory_method": METHOD_CUDA if args.device == "cuda" else METHOD_CPU,
                          "timing": timing, "memory": memory, "summary": summarize(memory)})
    return 0


def build(model_cfg: dict[str, Any], device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_clip(**model_cfg, vocab_size=49408, dropout=0.1, patch_dropout=0.25).to(device).train()


def make_batch(model_cfg: dict[str, Any], batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(batch)
    images = torch.randn(batch, 3, model_cfg["image_size"], model_cfg["image_size"], generator=gen)
    texts = torch.randint(0, 49408, (batch, model_cfg["context_length"]), generator=gen)
    return images.to(device), texts.to(device)


def plain_step(model: torch.nn.Module, images: torch.Tensor, texts: torch.Tensor, *, loss_cfg: LossConfig) -> None:
    out = model(images, texts)
    contrastive_loss(loss_cfg, out["image_features"], out["text_features"], out["logit_scale"]).backward()


def run_step(model, images, texts, *, mode: str, chunk_size: int) -> None:
    """plain: one forward/backward; accumulate: one forward/backward per chunk with a per-chunk loss
    (not the global-batch gradient: it isolates the cost of chunking); gradcache: exact;
    forward: the no-grad forward of every chunk but the last, which is what gradient caching adds
    to a step."""
    model.zero_grad(set_to_none=False)  # keep gradient buffers: they belong to the steady state
    if mode == "forward":
        with torch.no_grad():
            for chunk_images, chunk_texts in list(zip(images.split(chunk_size), texts.split(chunk_size)))[:-1]:
                model(chunk_images, chunk_texts)
    elif mode == "plain":
        plain_step(model, images, texts, loss_cfg=LossConfig())
    elif mode == "accumulate":
        for chunk_images, chunk_texts in zip(images.split(chunk_size), texts.split(chunk_size)):
            plain_step(model, chunk_images, chunk_texts, loss_cfg=LossConfig())
    else:
        gradcache_step(model, images, texts, chunk_size=chunk_size, loss_cfg=LossConfig())


def time_steps(model_cfg: dict[str, Any], *, batch: int, chunk_size: int, steps: int,
               device: torch.device) -> dict[str, Any]:
    """Median seconds per step of plain and gradient-cached steps, interleaved on one batch.

    The ideal gradient-cache ratio is (plain + the no-grad forward of K-1 of the K chunks) / plain:
    1 + (K-1)/(3K) when backward costs twice the forward, more for models whose backward is
    relatively cheaper.
    """
    model = build(model_cfg, device)
    images, texts = make_batch(model_cfg, batch, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {"plain": [], "accumulate": [], "gradcache": [], "forward": []}
    for step in range(steps + 1):
        for mode in times:
            sync()
            start = time.perf_counter()
            run_step(model, images, texts, mode=mode, chunk_size=chunk_size)
            sync()
            if step > 0:  # step 0 warms up kernels and allocations
                times[mode].append(time.perf_counter() - start)
    median = {mode: statistics.median(t) for mode, t in times.items()}
    return {"batch": batch, "chunk_size": chunk_size, **{f"{mode}_s": t for mode, t in median.items()},
            "ratio_gradcache_over_plain": median["gradcache"] / median["plain"],
            "ratio_gradcache_over_accumulate": median["gradcache"] / median["accumulate"],
            "ideal_ratio": (median["plain"] + median["forward"]) / median["plain"], "times_s": times}


def memory_case(case: dict[str, Any]) -> dict[str, Any]:
    """One (mode, batch) in this fresh process: peak memory of a step above the steady state."""
    device = torch.device(case["device"])
    model_cfg = {key: case[key] for key in MODEL_KEYS}
    model = build(model_cfg, device)
    warm = make_batch(model_cfg, min(case["batch"], case["chunk_size"]), device)
    run_step(model, *warm, mode=case["mode"], chunk_size=case["chunk_size"])  # allocates gradients
    images, texts = make_batch(model_cfg, case["batch"], device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    before = torch.cuda.memory_allocated() if device.type == "cuda" else rss_bytes()
    run_step(model, images, texts, mode=case["mode"], chunk_size=case["chunk_size"])
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()
    result = {**case, "steady_mib": before / 2**20, "total_peak_mib": peak / 2**20,
              "extra_peak_mib": max(0, peak - before) / 2**20}
    if device.type == "cpu":  # RSS includes malloc's fragmentation; live tensor bytes do not
        tensors = peak_tensor_bytes(lambda: run_step(model, images, texts, mode=case["mode"],
                                                     chunk_size=case["chunk_size"]))
        result["extra_tensor_peak_mib"] = tensors / 2**20
    return result


def summarize(memory: list[dict[str, Any]]) -> dict[str, Any]:
    """Peak memory at the largest batch over the smallest, per mode (extra and total)."""
    out = {}
    for mode in ("gradcache", "plain"):
        rows = sorted((r for r in memory if r["mode"] == mode and "error" not in r), key=lambda r: r["batch"])
        if len(rows) >= 2:
            small, large = rows[0], rows[-1]
            out[mode] = {"batch_ratio": large["batch"] / small["batch"],
                         "extra_peak_ratio": (large["extra_peak_mib"] / small["extra_peak_mib"]
                                              if small["extra_peak_mib"] > 0 else None),  # below RSS resolution
                         "total_peak_ratio": large["total_peak_mib"] / small["total_peak_mib"]}
            if "extra_tensor_peak_mib" in small:
                out[mode]["extra_tensor_peak_ratio"] = large["extra_tensor_peak_mib"] / small["extra_tensor_peak_mib"]
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(main())
