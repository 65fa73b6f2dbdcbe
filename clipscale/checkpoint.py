"""Sharded checkpoints with torch.distributed.checkpoint (DCP): atomic, resumable, prunable.

Layout of `RUN_DIR/checkpoints/`:

    step_000100/            a complete checkpoint (only complete ones carry this name)
        .metadata, *.distcp DCP shards of {"model": ..., "optim": ...}
        meta.json           {"step", "samples_seen", "loader", "config"} (written last)
        rng_rank{r}.pt      per-rank RNG states as tensors and plain data (loaded with weights_only)
    step_000200.tmp/        being written; never loaded, removed on the next save
    step_000050.pruned/     being deleted by retention (renamed first, so it vanishes at once)

A checkpoint is written under a `.tmp` name by all ranks and renamed by rank 0 after a barrier,
so a job killed mid-save leaves the previous checkpoint as the newest complete one. The scan of
complete `step_*` directories is the one record of which checkpoint is latest: no pointer file
can disagree with it.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from clipscale import dist

log = logging.getLogger(__name__)
# Single-process save/load (world size 1, `clipscale eval`) is intended, not a misconfiguration.
warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
META = "meta.json"


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first: `step_N` directories with meta.json (not `.tmp`, not `.pruned`)."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.glob("step_*") if re.fullmatch(r"step_\d+", p.name) and (p / META).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    done = complete_checkpoints(ckpt_dir)
    return done[-1] if done else None


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / META).read_text())


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain data, so loading them unpickles no objects.

    Schema: {"python": random.getstate() (nested tuples of ints), "numpy": [name, keys (int64
    tensor), pos, has_gauss, cached_gaussian], "torch": uint8 tensor, "cuda": [uint8 tensor per
    device] when CUDA is available}.
    """
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached_gaussian],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states `rng_state` returned."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def restore_rng(path: Path) -> bool:
    """Restore this rank's RNG states saved in checkpoint `path`; False when it saved none.

    A checkpoint written on another world size has no file for a new rank. The file is loaded
    with `weights_only=True`: a file that needs arbitrary unpickling (code) is refused, not run.
    """
    rng_file = path / f"rng_rank{dist.rank()}.pt"
    if not rng_file.exists():
        return False
    try:
        state = torch.load(rng_file, weights_only=True)
    except pickle.UnpicklingError as e:
        raise RuntimeError(
            f"{rng_file} is not a clipscale RNG state: it holds objects whose loading could run code, "
            f"so it was refused. Restore the file from a trusted copy, or delete it to resume with "
            f"fresh per-rank seeds"
        ) from e
    set_rng_state(state)
    return True


def save_checkpoint(
    ckpt_dir: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer, step: int,
    meta: dict[str, Any], keep_last: int = 0, keep_every_samples: int = 0,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path."""
    final = ckpt_dir / checkpoint_name(step)
    tmp = final.with_name(final.name + ".tmp")
    if dist.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover from a killed save
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save(rng_state(), tmp / f"rng_rank{dist.rank()}.pt")
    dist.barrier()
    if dist.rank() == 0:
        (tmp / META).write_text(json.dumps({"step": step, **meta}, indent=1))
        if final.exists():  # the same step saved again after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(ckpt_dir, keep_last=keep_last, keep_every_samples=keep_every_samples)
    dist.barrier()
    log.info("saved checkpoint %s", final)
    return final


def _prune(ckpt_dir: Path, *, keep_last: int, keep_every_samples: int) -> None:
    """Delete all but the newest `keep_last` and those at multiples of `keep_every_samples`."""
    if keep_last <= 0:
        return
    for old in complete_checkpoints(ckpt_dir)[:-keep_last]:
        samples = read_meta(old)["samples_seen"]
        if not (keep_every_samples and samples % keep_every_samples == 0):
            # Renamed first: a reader that listed it (clipscale eval --watch) finds it gone, not half deleted.
            doomed = old.with_name(f"{old.name}.pruned")
            os.replace(old, doomed)
            shutil.rmtree(doomed)


def load_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Collective: load model + optimizer shards into the (possibly sharded) model; return meta.

    RNG states are left alone: `restore_rng` restores them where this rank saved some.
    """
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return read_meta(path)


def load_model_weights(path: Path, model: torch.nn.Module) -> None:
    """Load only the model part of a checkpoint into an unwrapped model (one process)."""
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state["model"])


def load_weights_if_present(path: Path, model: torch.nn.Module) -> dict[str, Any] | None:
    """`load_model_weights` and the meta, or None when the checkpoint is gone (pruned since it was listed)."""
    try:
        meta = read_meta(path)
        load_model_weights(path, model)
        return meta
    except Exception:
        if (path / META).is_file():  # still there under its name: a real error
            raise
        return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the latest complete one of a run directory."""
    path = Path(path)
    if (path / META).is_file():
        return path
    latest = latest_checkpoint(path / "checkpoints")
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a complete checkpoint nor a run directory with one")
    return latest

