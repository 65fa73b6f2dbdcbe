"""Peak-memory measurement for the loss and gradient-cache benchmarks.

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
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parents[1]
METHOD_CPU = ("fresh subprocess per case; peak RSS (VmHWM, reset via /proc/self/clear_refs just before the "
              "measured work) minus the RSS just before it (inputs/model allocated)")
METHOD_CUDA = "torch.cuda.max_memory_allocated during the measured work minus memory_allocated just before"


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
    """Run `python -m MODULE --case JSON` in a fresh process (from the repository root) and return the
    JSON it prints last; a failed case comes back with an "error" naming the exit status and stderr."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", module, "--case", json.dumps(case)], capture_output=True,
                          text=True, timeout=timeout_s, env=env, cwd=REPO)
    if proc.returncode != 0:
        return {**case, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])
