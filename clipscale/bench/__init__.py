"""Benchmarks writing JSON (`clipscale bench NAME --out FILE.json`), and what they share.

Peak memory on CPU: tracemalloc does not see torch's allocations, so each configuration runs in a
fresh Python subprocess (`run_isolated`). Just before the measured work (inputs and model already
allocated, one warm-up done) it resets the kernel's peak-RSS counter (`/proc/self/clear_refs` <- 5)
and afterwards reads it back (`VmHWM` in `/proc/self/status`); "extra" is that peak minus the RSS
just before. Without the reset, peaks from imports and model construction mask the step's own.
On CUDA the allocator's `max_memory_allocated` is used instead, reset before the measured work.
RSS also counts what malloc keeps after fragmentation; `peak_tensor_bytes` is the CPU analogue of
`max_memory_allocated` (bytes of live tensors), from the profiler's allocation events.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any, Callable

import open_clip
import torch

METHOD_CPU = ("fresh subprocess per case; peak RSS (VmHWM, reset via /proc/self/clear_refs just before the "
              "measured work) minus the RSS just before it (inputs/model allocated)")
METHOD_CUDA = "torch.cuda.max_memory_allocated during the measured work minus memory_allocated just before"


def tiny_clip(*, width: int = 32, layers: int = 2, embed_dim: int = 16, image_size: int = 16,
              patch_size: int = 4, context_length: int = 8, vocab_size: int = 100,
              dropout: float = 0.0, patch_dropout: float = 0.0, logit_bias: float | None = None,
              ) -> torch.nn.Module:
    """A small open_clip `CLIP` (ViT + text transformer) built offline, `output_dict=True`.

    open_clip's native towers expose only patch dropout, so `dropout` is added where it acts in
    real models: attention-probability dropout and an MLP output dropout in every block of both
    towers. Tests use it with all dropouts on to check that gradient caching replays the masks.
    """
    model = open_clip.create_model(
        "ViT-B-32", pretrained=None, output_dict=True, embed_dim=embed_dim, init_logit_bias=logit_bias,
        vision_cfg={"image_size": image_size, "patch_size": patch_size, "width": width, "layers": layers,
                    "head_width": 16, "patch_dropout": patch_dropout},
        text_cfg={"context_length": context_length, "vocab_size": vocab_size, "width": width,
                  "heads": max(1, width // 16), "layers": layers},
    )
    if dropout > 0:
        for tower in (model.visual.transformer, model.transformer):
            for block in tower.resblocks:
                block.attn.dropout = dropout  # nn.MultiheadAttention reads this at every forward
                block.mlp.add_module("drop", torch.nn.Dropout(dropout))
    return model


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc), in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Set the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    """Peak RSS since the last `reset_peak_rss` (or process start), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError("VmHWM not found in /proc/self/status: peak RSS needs Linux")


def peak_tensor_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of CPU tensors allocated during `fn()` and alive at once, above those alive before."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # an op's own allocations are its self memory; frees are separate "[memory]" events with negative sizes
    deltas = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, delta in deltas:
        live += delta
        peak = max(peak, live)
    return peak


def run_isolated(module: str, case: dict[str, Any], *, timeout_s: float = 1800) -> dict[str, Any]:
    """Run `python -m MODULE --case JSON` in a fresh process and return the JSON it prints last."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", module, "--case", json.dumps(case)], capture_output=True,
                          text=True, timeout=timeout_s, env=env)
    if proc.returncode != 0:
        return {**case, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def environment() -> dict[str, Any]:
    """What the figures were measured on."""
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_json(path: str, payload: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")
