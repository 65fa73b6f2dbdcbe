"""Whether a run's training is alive, for a watcher beside it (`clipscale eval --watch`).

Rank 0 of the trainer writes `RUN/training.json` ({"host", "pid"}) when it starts and removes it
when it exits, however it exits; on a stop signal it first writes `RUN/preempted` (the run will be
started again). A trainer killed outright leaves training.json behind: on the same host its pid
tells, elsewhere only the run's silence (no new metrics line, checkpoint or marker) does.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Iterator

TRAINING = "training.json"
PREEMPTED = "preempted"
"""Written on a stop signal after the save: slurm/train.sbatch requeues the job when it finds it."""


@contextlib.contextmanager
def training_marker(run_dir: Path, *, enabled: bool) -> Iterator[None]:
    """Mark the run as training (rank 0: `enabled`) for the duration of the block."""
    if not enabled:
        yield
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    marker = run_dir / TRAINING
    marker.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}) + "\n")
    (run_dir / PREEMPTED).unlink(missing_ok=True)  # this start supersedes a saved-and-stopped one
    try:
        yield
    finally:
        marker.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def training_stopped(run_dir: Path) -> str | None:
    """Why the run is known not to be training now, or None while it may be (or will be again)."""
    if (run_dir / PREEMPTED).exists():
        return None  # saved on a signal; its job is requeued
    marker = run_dir / TRAINING
    try:
        owner = json.loads(marker.read_text())
    except FileNotFoundError:
        return f"training is not running (no {marker})"
    except ValueError:
        return None  # being written
    pid = owner.get("pid")
    if owner.get("host") == socket.gethostname() and isinstance(pid, int) and pid > 0 and not _alive(pid):
        return f"the training process {owner['pid']} on {owner['host']} is gone (killed?)"
    return None


def activity(run_dir: Path) -> tuple:
    """What changes while a run trains: its metrics log, marker and checkpoint directories."""
    def stat(path: Path) -> tuple[int, int] | None:
        try:
            s = path.stat()
            return s.st_size, s.st_mtime_ns
        except FileNotFoundError:
            return None

    checkpoints = tuple(sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")))
    return stat(run_dir / "metrics.jsonl"), stat(run_dir / TRAINING), checkpoints
