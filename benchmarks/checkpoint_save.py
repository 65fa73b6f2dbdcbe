"""Checkpoint save benchmark: how long a save blocks the training step, synchronous vs asynchronous.

    python -m benchmarks.checkpoint_save --out docs/bench/checkpoint_save.json --params-m 302 --repeats 3

The clipscale `Checkpointer` (DCP with the safetensors writer) saves a model of `--params-m`
million fp32 parameters (a stack of square Linear layers of `--width`) on CPU, one process. A
synchronous save (`dcp.save`, what emergency saves use) blocks for the whole write; an asynchronous
one (`dcp.async_save`, periodic saves) blocks while the state is copied, then writes in a thread.
The two modes alternate, each repeat into a fresh directory, after one untimed warm-up save of
each (the first asynchronous save also sets up its thread, which the warm-up records).
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from clipscale import checkpoint as ckpt
from clipscale.bench import environment, write_json


@dataclasses.dataclass
class Progress:
    step: int = 1
    samples_seen: int = 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.checkpoint_save", description=__doc__.splitlines()[0])
    p.add_argument("--out", help="JSON file to write")
    p.add_argument("--params-m", type=float, default=302, help="model size in millions of parameters")
    p.add_argument("--width", type=int, default=4096, help="width of each square Linear layer")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", help="where to write (default: a temporary directory)")
    return p.parse_args(argv)


def linear_stack(params: float, width: int) -> torch.nn.Module:
    layers = max(1, round(params / (width * width + width)))
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])


def timed_save(model: torch.nn.Module, root: Path, *, asynchronous: bool) -> dict[str, float]:
    """Seconds the save call blocked, and until the checkpoint was complete."""
    ckpt_dir = Path(tempfile.mkdtemp(dir=root))
    saver = ckpt.Checkpointer(ckpt_dir, states={"model": ckpt.ModelState(model)}, policy=ckpt.RetentionPolicy(),
                              async_periodic=asynchronous)
    t0 = time.perf_counter()
    saver.save(Progress())
    blocked = time.perf_counter() - t0
    saver.wait()
    complete = time.perf_counter() - t0
    shutil.rmtree(ckpt_dir)
    return {"blocked_s": blocked, "complete_s": complete}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    model = linear_stack(args.params_m * 1e6, args.width)
    params = sum(p.numel() for p in model.parameters())
    root = Path(args.dir or tempfile.mkdtemp(prefix="clipscale-ckpt-bench-"))
    warmup = {mode: timed_save(model, root, asynchronous=mode == "async") for mode in ("sync", "async")}
    runs: dict[str, list[dict[str, float]]] = {"sync": [], "async": []}
    for _ in range(args.repeats):
        for mode in runs:
            runs[mode].append(timed_save(model, root, asynchronous=mode == "async"))
    median = {mode: {k: statistics.median(r[k] for r in rs) for k in ("blocked_s", "complete_s")}
              for mode, rs in runs.items()}
    result = {"model": f"{len(model)} x Linear({args.width}, {args.width}), fp32", "params": params,
              "bytes": params * 4, "repeats": args.repeats, "warmup": warmup, "runs": runs, "median": median,
              "blocking_ratio_sync_over_async": median["sync"]["blocked_s"] / median["async"]["blocked_s"],
              "environment": environment()}
    print(f"{params / 1e6:.0f}M params: sync blocks {median['sync']['blocked_s']:.2f} s, async blocks "
          f"{median['async']['blocked_s']:.2f} s (complete after {median['async']['complete_s']:.2f} s)")
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
