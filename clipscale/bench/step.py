"""Trainer step throughput and MFU: `clipscale bench step RECIPE [overrides] --out FILE.json`.

Runs the real `train_step` (parallelism, precision, checkpointing and gradient cache from the
recipe) on fixed random inputs, so the figure is the model step alone, without data loading.
Under torchrun it measures the distributed step; MFU is reported on GPUs with a known peak.

    clipscale bench step recipes/tiny_cpu.toml --steps 20 --out bench_out/step.json
    torchrun --nproc_per_node=8 -m clipscale bench step recipes/vit_b16_gpu.toml train.precision=bf16
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from clipscale.compute import model_flops_per_sample
from clipscale.config import load_config, validate_for_world
from clipscale.dist import destroy_distributed, init_distributed
from clipscale.metrics import StepTimer, mfu, peak_flops
from clipscale.models import build_model
from clipscale.optim import build_optimizer
from clipscale.parallel import parallelize
from clipscale.train import configure_threads, train_step


def measure(cfg, *, steps: int, warmup: int) -> dict:
    info = init_distributed(device=cfg.run.device)
    try:
        configure_threads(cfg, info)
        torch.manual_seed(cfg.run.seed)
        bundle = build_model(cfg.model, device=info.device)
        flops_per_sample = model_flops_per_sample(cfg.model)  # MFU's numerator: no recomputation
        model = parallelize(bundle.model, cfg.train, info)
        optimizer = build_optimizer(model, cfg.optim)
        batch = cfg.train.global_batch_size // info.world_size
        images = torch.randn(batch, 3, bundle.image_size, bundle.image_size, device=info.device)
        texts = torch.randint(0, 49408, (batch, bundle.context_length), device=info.device)
        timer = StepTimer(info.device)
        for i in range(warmup + steps):
            if i == warmup:
                sync(info.device)
                t0 = time.perf_counter()
            train_step(model, images, texts, optimizer=optimizer, cfg=cfg, device=info.device, timer=timer)
        sync(info.device)
        per_device = batch * steps / (time.perf_counter() - t0)
        device_name = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu"
        peak_mem = torch.cuda.max_memory_allocated(info.device) / 2**30 if info.device.type == "cuda" else None
        return {
            "device": device_name, "world_size": info.world_size, "model": cfg.model.name,
            "global_batch_size": cfg.train.global_batch_size, "precision": cfg.train.precision,
            "parallel": cfg.train.parallel, "grad_checkpointing": cfg.train.grad_checkpointing,
            "chunk_size": cfg.train.chunk_size, "compile": cfg.train.compile, "steps": steps,
            "samples_per_s": per_device * info.world_size, "samples_per_s_per_device": per_device,
            "model_tflops_per_s_per_device": flops_per_sample * per_device / 1e12,
            "mfu": mfu(flops_per_sample=flops_per_sample, samples_per_s_per_device=per_device,
                       peak=peak_flops(device_name)),
            "peak_memory_gb": peak_mem, "rank": info.rank,
        }
    finally:
        destroy_distributed()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clipscale bench step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default="bench_out/step.json")
    args = parser.parse_args(argv)
    cfg = load_config(args.recipe, args.overrides)
    validate_for_world(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    result = measure(cfg, steps=args.steps, warmup=args.warmup)
    if result["rank"] == 0:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
    return 0
