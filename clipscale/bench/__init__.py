"""`clipscale bench NAME`: what a user measures on their own storage and GPUs, written as JSON.

`loader`: the training loader's rate on given shards; `step`: trainer step time and MFU. The
comparisons with other pipelines, shard generators and memory benchmarks behind the published
figures live in the repository's top-level `benchmarks/` (not installed with the package).
"""
from __future__ import annotations

import json
import os
import resource
import time
from typing import Any, Callable, Iterator

import torch


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


def time_batches(batches: Iterator[int], *, warmup: int, samples: int) -> dict[str, float]:
    """Samples/s of an iterator of batch sizes: `warmup` batches untimed, then at least `samples`."""
    for _ in range(warmup):
        next(batches)
    seen, start = 0, time.perf_counter()
    while seen < samples:
        seen += next(batches)
    seconds = time.perf_counter() - start
    return {"samples": seen, "seconds": seconds, "samples_per_s": seen / seconds}


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


def measure(run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`run()`'s figures plus how busy other processes kept the machine meanwhile (they skew every rate).

    Children count once reaped, so `run` must shut its worker processes down before returning.
    """
    before, start = cpu_seconds(), time.perf_counter()
    figures = run()
    figures["other_processes_cpu_fraction"] = other_cpu_fraction(before, cpu_seconds(),
                                                                 wall_s=time.perf_counter() - start)
    return figures
