"""One metrics logger: JSONL file, console `key=value` lines, optional wandb, rank-0 progress bar."""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from clipscale.config import LogConfig

log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per device, for MFU (vendor datasheets; no sparsity).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def peak_flops(device_name: str) -> float | None:
    for key, value in PEAK_FLOPS.items():
        if key in device_name:
            return value
    return None


def mfu(*, flops_per_sample: float, samples_per_s_per_device: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak (PaLM, App. B).

    flops_per_sample counts forward + backward (3x the forward FLOPs), without recomputation.
    """
    if peak is None:
        return None
    return flops_per_sample * samples_per_s_per_device / peak


class MetricsLogger:
    """Writes step metrics on rank 0 only; other ranks get a no-op logger."""

    def __init__(self, run_dir: Path, cfg: LogConfig, *, enabled: bool, total_steps: int,
                 config: dict[str, Any], start_step: int = 0):
        self.enabled = enabled
        self.file = None
        self.bar = None
        self.wandb_run = None
        if not enabled:
            return
        self.file = open(run_dir / "metrics.jsonl", "a")
        if cfg.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=run_dir.name, file=sys.stderr,
                            dynamic_ncols=True, mininterval=1.0)
        if cfg.wandb != "disabled":
            import wandb

            self.wandb_run = wandb.init(project=cfg.wandb_project, name=run_dir.name, dir=str(run_dir),
                                        mode=cfg.wandb, config=config, resume="allow")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {k: v for k, v in record.items() if not (isinstance(v, float) and math.isnan(v))}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        log.info(" ".join(f"{k}={_fmt(v)}" for k, v in record.items()))
        if self.bar is not None and "loss" in record:  # the step-0 record (params, GMACs) has no loss yet
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
        if self.wandb_run is not None:
            self.wandb_run.log(record, step=record.get("step"))

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def _fmt(v: Any) -> str:
    return f"{v:.6g}" if isinstance(v, float) else str(v)


class StepTimer:
    """Wall-clock phases of a step (data wait, forward, backward, optimizer), in seconds.

    With `sync` set, the device is synchronised at each lap so GPU phases are timed exactly; the
    loop sets it only on logged steps, leaving the other steps free of host-device syncs.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sync = False
        self.marks: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.sync and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # host sync: logged steps only
        now = time.perf_counter()
        self.marks[phase] = self.marks.get(phase, 0.0) + now - self._t
        self._t = now

    def pop(self) -> dict[str, float]:
        """Phase totals since the last pop (the whole log interval), then reset."""
        marks, self.marks = self.marks, {}
        return marks
