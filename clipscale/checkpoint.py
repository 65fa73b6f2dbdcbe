"""The one checkpointer: every piece of training state a `Stateful`, saved through DCP as safetensors.

Layout of `RUN_DIR/checkpoints/`:

    step_000100/            a complete checkpoint (only complete ones carry this exact name)
        shard-*.safetensors DCP shards, one file per rank that wrote tensors: "model.*", "optim.*"
                            (per-parameter state), and plain data as JSON in uint8 tensors:
                            "progress", "loader", "grad_scaler", "rng_rank{r}" (one per rank)
        meta.json           {"step", "samples_seen", ... (the progress), "world_size", "emergency",
                            "config"}: a summary for tools that do not load the state; written last
    step_000200.tmp/        being written; never loaded, removed by the next save
    step_000100.old/        a checkpoint being replaced by one of the same step; removed next
    step_000050.pruned/     being deleted by retention (renamed first: a reader that listed it, such as
                            `clipscale eval --watch`, finds it gone rather than half deleted)

Trust: loading parses JSON (meta.json, safetensors headers, the plain-data tensors) and copies raw
tensor bytes; nothing from the directory is unpickled, so a tampered checkpoint cannot run code.
A checkpoint directory holding anything besides meta.json and the shards (a pickled DCP
`.metadata`, `.distcp` or `.pt` of an older clipscale, or a tampered file) is refused before any
tensor is read.

Every method of `Checkpointer` is collective. Rank 0 alone picks the checkpoint to load and
broadcasts it (ranks on a shared filesystem may list it differently), and does the file work of
a save (meta.json, rename, retention) reporting a failure to every rank (`dist.main_does`).
With `async_periodic` (`train.async_checkpoint`) periodic saves are asynchronous (`dcp.async_save`:
the step waits only for the copy of the state) and the save thread completes the checkpoint once
every rank wrote; the next save (emergency ones are synchronous) and the end of the run wait for it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import shutil
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from clipscale import dist
from clipscale.errors import InputError

log = logging.getLogger(__name__)
# Single-process save/load (world size 1, `clipscale eval`) is intended, not a misconfiguration.
warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
META = "meta.json"
COMPLETE = re.compile(r"step_(\d+)")
LEFTOVER = re.compile(r"step_\d+\.(tmp|old|pruned)")
SHARD = re.compile(r"shard-\d+-model-\d+-of-\d+\.safetensors")
_FLAT_OPTIM = StateDictOptions(flatten_optimizer_state_dict=True)


class CheckpointError(InputError):
    """A checkpoint directory is not one clipscale can load safely; the message names the file."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first: `step_N` directories with meta.json (not `.tmp`, `.old`, `.pruned`)."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if COMPLETE.fullmatch(p.name) and (p / META).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    done = complete_checkpoints(ckpt_dir)
    return done[-1] if done else None


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((path / META).read_text())


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the latest complete one of a run directory."""
    path = Path(path)
    if (path / META).is_file():
        return path
    latest = latest_checkpoint(path / "checkpoints")
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a complete checkpoint nor a run directory with one")
    return latest


# ---------------------------------------------------------------------------------------------
# Retention: a pure policy over the complete checkpoints.


@dataclasses.dataclass(frozen=True, kw_only=True)
class RetentionPolicy:
    keep_last: int = 0
    """Keep this many newest checkpoints (0 = keep every checkpoint)."""
    keep_every_samples: int = 0
    """Also keep the first checkpoint at or after each multiple of this many samples (0 = none)."""


@dataclasses.dataclass(frozen=True)
class Saved:
    """A complete checkpoint as retention sees it."""

    step: int
    samples_seen: int


def to_delete(checkpoints: Sequence[Saved], policy: RetentionPolicy) -> list[Saved]:
    """The checkpoints `policy` drops, from `checkpoints` (any order).

    Checkpoints are written at the first step that crosses an interval, so their sample counts are
    multiples of the global batch, not of `keep_every_samples`: a checkpoint is kept for that
    interval when a multiple lies in (previous checkpoint's samples, its samples].
    """
    if policy.keep_last <= 0:
        return []
    ordered = sorted(checkpoints, key=lambda c: c.samples_seen)
    keep = set(ordered[-policy.keep_last:])
    every, previous = policy.keep_every_samples, 0
    for c in ordered:
        if every and c.samples_seen // every > previous // every:
            keep.add(c)
        previous = c.samples_seen
    return [c for c in ordered if c not in keep]


# ---------------------------------------------------------------------------------------------
# The pieces of training state, each a Stateful whose state holds tensors only.


class ModelState(Stateful):
    """The model's parameters and buffers (full or FSDP2-sharded), under "model.<fqn>"."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state)


class OptimizerState(Stateful):
    """The optimizer's per-parameter state ("state.<fqn>.exp_avg", ...), tensors only.

    Hyperparameters (param groups) are not saved: the config sets them and the schedule sets the
    learning rate every step, and a resume with a changed config is refused unless asked for.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        state = get_optimizer_state_dict(self.model, self.optimizer, options=_FLAT_OPTIM)
        return {k: v for k, v in state.items() if k.startswith("state.")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        current = get_optimizer_state_dict(self.model, self.optimizer, options=_FLAT_OPTIM)
        groups = {k: v for k, v in current.items() if not k.startswith("state.")}
        set_optimizer_state_dict(self.model, self.optimizer, {**groups, **state}, options=_FLAT_OPTIM)


class PlainState(Stateful):
    """Plain data (what `json.dumps` takes) kept as its JSON text in one uint8 tensor, so that the
    checkpoint holds tensors only and loading it parses JSON."""

    def __init__(self, get: Callable[[], Any], set: Callable[[Any], None]) -> None:
        self.get, self.set = get, set

    def state_dict(self) -> dict[str, Any]:
        return {"json": torch.frombuffer(bytearray(json.dumps(self.get()).encode()), dtype=torch.uint8)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.set(json.loads(state["json"].numpy().tobytes().decode()))


def rng_state() -> dict[str, Any]:
    """This process's RNG states as plain data.

    Schema: {"python": random.getstate() as lists, "numpy": [name, keys (624 ints), pos,
    has_gauss, cached_gaussian], "torch": CPU generator bytes, "cuda": [bytes per device] when
    CUDA is available}.
    """
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached_gaussian)],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the states `rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def rng_key(rank: int) -> str:
    """Each rank's RNG states are saved under a key of their own."""
    return f"rng_rank{rank}"


# ---------------------------------------------------------------------------------------------
# Safe storage and loading.


def check_layout(path: Path) -> None:
    """Refuse a checkpoint directory holding anything but meta.json and DCP safetensors shards.

    Nothing else is ever read, but a pickled DCP file (`.metadata`, `*.distcp`, an RNG `.pt`) means
    a checkpoint of an older clipscale or a tampered one: loading it the DCP default way would
    unpickle, so clipscale says so rather than skipping it silently.
    """
    for p in sorted(path.iterdir()):
        if p.name != META and not SHARD.fullmatch(p.name):
            raise CheckpointError(
                f"{p}: a clipscale checkpoint holds only {META} and shard-*.safetensors files; this "
                f"file may hold pickled objects (an older clipscale's checkpoint, or a tampered one), "
                f"and loading it could run code, so the checkpoint was refused. Remove the file if "
                f"you trust the rest of {path.name}, or resume from another checkpoint")


def saved_keys(path: Path) -> dict[str, torch.Size]:
    """Every tensor the checkpoint holds and its size, read from the safetensors headers (JSON)."""
    check_layout(path)
    metadata = HuggingFaceStorageReader(str(path)).read_metadata()
    return {fqn: md.size for fqn, md in metadata.state_dict_metadata.items()}


def load_states(path: Path, states: dict[str, Stateful], *, no_dist: bool = False) -> set[str]:
    """Collective (unless `no_dist`: this process alone): load `states` from checkpoint `path`;
    returns the names it held.

    A plain-data state the checkpoint lacks is left alone (a rank the saving job did not have has
    no RNG states); a model or optimizer tensor it lacks is an error.
    """
    saved = saved_keys(path)
    template: dict[str, Any] = {}
    for name, state in states.items():
        if isinstance(state, PlainState):
            if f"{name}.json" in saved:  # sized as saved: DCP loads into tensors of the saved size
                template[name] = {"json": torch.empty(saved[f"{name}.json"], dtype=torch.uint8)}
        else:
            template[name] = state.state_dict()
    dcp.load(template, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=no_dist)
    for name in template:
        states[name].load_state_dict(template[name])
    return set(template)


def load_model_weights(path: Path, model: torch.nn.Module) -> None:
    """Load only the model part of a checkpoint into an unwrapped model, in this process alone
    (each rank of an evaluation loads the whole model for itself)."""
    load_states(path, {"model": ModelState(model)}, no_dist=True)


def load_weights_if_present(path: Path, model: torch.nn.Module) -> dict[str, Any] | None:
    """`load_model_weights` and the meta, or None when the checkpoint is gone (pruned since it was listed)."""
    try:
        meta = read_meta(path)
        load_model_weights(path, model)
        return meta
    except Exception:
        if (path / META).is_file():  # still there under its name: a real error (a refused file, ...)
            raise
        return None


# ---------------------------------------------------------------------------------------------
# The checkpointer.


def choose_checkpoint(ckpt_dir: Path) -> dict[str, Any] | None:
    """Collective: the meta.json of the newest complete checkpoint as rank 0 sees it, on every rank
    (None: none). Ranks of a shared filesystem may list it differently; they load what rank 0 chose."""
    def newest() -> dict[str, Any] | None:
        latest = latest_checkpoint(Path(ckpt_dir))
        return None if latest is None else read_meta(latest)
    return dist.rank0_value(newest)  # what it raises (a corrupt meta.json) is raised on every rank


class Checkpointer:
    """Saves and loads a run's training state in `ckpt_dir`. Collective: every rank calls every method.

    `states` maps names to the Statefuls of the job (model, optimizer, loader, ...); this rank's
    RNG states are added under `rng_key(rank)`. `meta` is written into each checkpoint's meta.json
    beside the step and sample count (the run's config), for tools that read it without loading.
    With `async_periodic`, periodic saves return once the state is copied and write in a thread,
    whose collectives fail after `collective_timeout_s` (as the training's: `train.collective_timeout_s`).
    """

    def __init__(self, ckpt_dir: Path, *, states: dict[str, Stateful], policy: RetentionPolicy,
                 meta: dict[str, Any] | None = None, async_periodic: bool = False,
                 collective_timeout_s: float = 1800.0) -> None:
        self.ckpt_dir, self.policy, self.meta = Path(ckpt_dir), policy, meta or {}
        self.states = {**states, rng_key(dist.rank()): PlainState(rng_state, set_rng_state)}
        self.async_periodic = async_periodic
        # DCP's async save runs its collectives in a thread: on a group of their own, or they would
        # interleave with the training step's collectives on the default group.
        self.async_group = dist.new_cpu_group(timeout_s=collective_timeout_s) if async_periodic else None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self.pending: tuple[Future, Path] | None = None  # (completion of the asynchronous save, its path)

    def load(self, meta: dict[str, Any]) -> bool:
        """Load the checkpoint `choose_checkpoint` returned; returns whether this rank's RNG states were in it
        (a rank the saving job did not have must seed its own)."""
        path = self.ckpt_dir / checkpoint_name(meta["step"])
        loaded = load_states(path, self.states)
        log.info("resumed from %s (step %d, %d samples)", path, meta["step"], meta["samples_seen"])
        return rng_key(dist.rank()) in loaded

    def save(self, progress: Any, *, emergency: bool = False) -> None:
        """Save the states as the checkpoint of `progress.step` (`progress.samples_seen` samples).

        An emergency save (non-finite stop, preemption) is synchronous and never deletes a
        checkpoint: the newest one before the trouble may be the last good weights. Any other save
        with `async_periodic` returns once the states are copied; the shards are written and the
        checkpoint completed in a thread, and the next save (or `wait`) waits for it.
        """
        self.wait()
        final = self.ckpt_dir / checkpoint_name(progress.step)
        tmp = final.with_name(final.name + ".tmp")
        dist.main_does(lambda: self._prepare(tmp), what=f"preparing {tmp}")
        meta = {**vars(progress), "world_size": dist.world_size(), "emergency": emergency, **self.meta}
        writer = HuggingFaceStorageWriter(str(tmp), save_distributed=True)
        if self.async_periodic and not emergency:
            staged = dcp.async_save(self.states, storage_writer=writer, process_group=self.async_group)
            self.pending = (self.executor.submit(self._complete, staged, tmp, meta), final)
            return
        dcp.save(self.states, storage_writer=writer)
        dist.main_does(lambda: self._publish(tmp, meta), what=f"completing checkpoint {final}")
        log.info("saved checkpoint %s", final)

    def wait(self) -> None:
        """Collective: wait for the pending asynchronous save, if any; raises on every rank if it failed."""
        if self.pending is None:
            return
        (pending, final), self.pending = self.pending, None
        dist.each_does(pending.result, what=f"writing checkpoint {final}")
        log.info("saved checkpoint %s", final)

    def _complete(self, staged: Future, tmp: Path, meta: dict[str, Any]) -> None:
        """In the save thread: once DCP's save returned on rank 0 every rank has written its shards."""
        staged.result()
        if dist.rank() == 0:
            self._publish(tmp, meta)

    def _prepare(self, tmp: Path) -> None:
        """Rank 0: remove what killed saves or prunes left (`.tmp`, `.old`, `.pruned`), then create `tmp`."""
        for p in self.ckpt_dir.iterdir() if self.ckpt_dir.is_dir() else ():
            if LEFTOVER.fullmatch(p.name):
                shutil.rmtree(p)
        tmp.mkdir(parents=True)

    def _publish(self, tmp: Path, meta: dict[str, Any]) -> None:
        """Rank 0, after every rank wrote its shards: meta.json, the rename, retention."""
        final = tmp.with_name(tmp.name.removesuffix(".tmp"))
        write_synced(tmp / META, json.dumps(meta, indent=1))
        old = final.with_name(final.name + ".old")
        if final.exists():  # the same step saved again after a resume: the old one goes aside, not away
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(self.ckpt_dir)
        shutil.rmtree(old, ignore_errors=True)
        if not meta["emergency"]:
            self._prune()

    def _prune(self) -> None:
        paths = {Saved(m["step"], m["samples_seen"]): p
                 for p in complete_checkpoints(self.ckpt_dir) for m in [read_meta(p)]}
        for gone in to_delete(list(paths), self.policy):
            # Renamed first: a reader that listed it (`clipscale eval --watch`) finds it gone, not half deleted.
            doomed = paths[gone].with_name(paths[gone].name + ".pruned")
            os.replace(paths[gone], doomed)
            shutil.rmtree(doomed)


def write_synced(path: Path, text: str) -> None:
    """Write `text` and fsync it: meta.json marks a checkpoint complete, so it must be on disk first."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
