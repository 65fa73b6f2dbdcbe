"""Loss benchmark: peak extra memory and time of forward+backward, dense vs tiled, vs batch size.

    python -m benchmarks.loss --out loss.json --batches 1024 4096 16384 32768 --dim 512

Every (batch, form) runs in its own subprocess so its peak memory is its own (see
`benchmarks.memory`); dense and tiled at the same batch run back to back, so their time ratio is
measured under the same machine load. Features are random unit vectors (float32), one process.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.memory import METHOD_CPU, METHOD_CUDA, peak_rss_bytes, reset_peak_rss, rss_bytes, run_isolated
from clipscale.bench import environment, write_json
from clipscale.loss import LossConfig, contrastive_loss

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loss", description=__doc__.splitlines()[0])
    p.add_argument("--out", help="JSON file to write")
    p.add_argument("--batches", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--dense-max-batch", type=int, default=32768,
                   help="skip dense above this batch (its B^2 logits may not fit in memory)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--kinds", nargs="+", default=["clip"], choices=["clip", "siglip"])
    p.add_argument("--tile-size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=2, help="timed forward+backward passes per case (median)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))  # noqa: T201  (CLI output, read by the parent)
        return 0
    if not args.out:
        raise SystemExit("--out FILE.json is required")
    results = []
    for kind in args.kinds:
        for batch in args.batches:
            forms = [True] + ([False] if batch <= args.dense_max_batch else [])
            for tiled in forms:
                case = {"kind": kind, "batch": batch, "dim": args.dim, "tiled": tiled, "tile_size": args.tile_size,
                        "repeats": args.repeats, "device": args.device}
                results.append(run_isolated("benchmarks.loss", case))
                log.info("%s", results[-1])
    write_json(args.out, {"benchmark": "loss", "memory_method": METHOD_CUDA if args.device == "cuda" else METHOD_CPU,
                          "environment": environment(), "results": results, "summary": summarize(results)})
    return 0


def make_inputs(batch: int, dim: int, device: torch.device, *, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=gen, device=device), dim=1)
    text = F.normalize(torch.randn(batch, dim, generator=gen, device=device), dim=1)
    return [image.requires_grad_(), text.requires_grad_(), torch.tensor(14.3, device=device, requires_grad=True),
            torch.tensor(-10.0, device=device, requires_grad=True)]


def forward_backward(cfg: LossConfig, tensors: list[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None
    contrastive_loss(cfg, *tensors).backward()


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """One configuration in this (fresh) process: extra peak memory and median time of fwd+bwd."""
    device = torch.device(case["device"])
    cfg = LossConfig(kind=case["kind"], tiled=case["tiled"], tile_size=case["tile_size"])
    forward_backward(cfg, make_inputs(min(case["batch"], 256), case["dim"], device))  # warm-up: kernels, pools
    tensors = make_inputs(case["batch"], case["dim"], device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    before = torch.cuda.memory_allocated() if device.type == "cuda" else rss_bytes()
    times = []
    for _ in range(case["repeats"]):
        start = time.perf_counter()
        forward_backward(cfg, tensors)
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()
    return {**case, "extra_peak_mib": max(0, peak - before) / 2**20, "time_s": statistics.median(times),
            "times_s": times}


def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tiled / dense ratios of extra memory and time at every batch where both ran.

    A memory ratio is None where dense's extra peak is below what RSS resolves (small batches).
    """
    by_key = {(r["kind"], r["batch"], r["tiled"]): r for r in results if "error" not in r}
    rows = []
    for (kind, batch, tiled), tiled_row in sorted(by_key.items()):
        dense_row = by_key.get((kind, batch, False))
        if tiled and dense_row:
            rows.append({"kind": kind, "batch": batch,
                         "memory_ratio_tiled_over_dense": (tiled_row["extra_peak_mib"] / dense_row["extra_peak_mib"]
                                                           if dense_row["extra_peak_mib"] > 0 else None),
                         "time_ratio_tiled_over_dense": tiled_row["time_s"] / dense_row["time_s"]})
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(main())
