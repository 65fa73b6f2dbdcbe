"""The checkpointer on 2 gloo ranks: rank 0 decides, and its failures reach every rank.

Each worker writes what happened to rank{r}.pt (spawn_ranks loads them), so one rank's error does
not hide what the other did.
"""
import datetime
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from clipscale import checkpoint as ckpt
from tests.helpers import spawn_ranks

pytestmark = pytest.mark.slow
WORLD = 2
TIMEOUT_S = 120  # the process-group timeout: a rank left waiting fails with a timeout error instead


class Progress:
    def __init__(self, step: int) -> None:
        self.step, self.samples_seen = step, 10 * step


def start(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=TIMEOUT_S))


def saver(ckpt_dir: Path, *, meta: dict) -> ckpt.Checkpointer:
    model = torch.nn.Linear(4, 4)
    return ckpt.Checkpointer(ckpt_dir, states={"model": ckpt.ModelState(model)}, meta=meta,
                             policy=ckpt.RetentionPolicy())


def choose_worker(rank: int, port: int, out_dir: str) -> None:
    """Rank 1's listing lags (its view lacks step 4, as a stale shared-filesystem listing would)."""
    start(rank, port)
    view = Path(out_dir) / f"view{rank}"
    meta = ckpt.choose_checkpoint(view)
    torch.save({"step": meta["step"]}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_every_rank_resumes_the_checkpoint_rank_0_chose(tmp_path):
    s = saver(tmp_path / "view0", meta={})
    s.save(Progress(2))
    s.save(Progress(4))
    shutil.copytree(tmp_path / "view0", tmp_path / "view1")
    shutil.rmtree(tmp_path / "view1" / "step_000004")
    results = spawn_ranks(choose_worker, tmp_path, world=WORLD)
    assert [r["step"] for r in results] == [4, 4]


def failing_save_worker(rank: int, port: int, out_dir: str) -> None:
    """Rank 0's meta.json cannot be written (its config holds something JSON cannot encode)."""
    start(rank, port)
    s = saver(Path(out_dir) / "checkpoints", meta={"config": object() if rank == 0 else {}})
    try:
        s.save(Progress(1))
        outcome = "saved"
    except Exception as e:  # what each rank would report before exiting
        outcome = f"{type(e).__name__}: {e}"
    torch.save({"outcome": outcome}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_a_failing_rank_0_step_stops_every_rank_with_its_error(tmp_path):
    results = spawn_ranks(failing_save_worker, tmp_path, world=WORLD)
    assert results[0]["outcome"].startswith("TypeError: Object of type object is not JSON serializable")
    assert results[1]["outcome"].startswith("PeerRankError: rank 0 failed completing checkpoint")
    assert "not JSON serializable" in results[1]["outcome"]
    assert ckpt.complete_checkpoints(tmp_path / "checkpoints") == []


def async_group_worker(rank: int, port: int, out_dir: str) -> None:
    start(rank, port)
    saver = ckpt.Checkpointer(Path(out_dir) / "ckpt", states={"model": ckpt.ModelState(torch.nn.Linear(4, 4))},
                              policy=ckpt.RetentionPolicy(), async_periodic=True, collective_timeout_s=5)
    backend = saver.async_group._get_backend(torch.device("cpu"))
    torch.save({"timeout_s": backend.options._timeout.total_seconds()}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_the_save_thread_gives_up_on_a_lost_peer_after_the_training_timeout(tmp_path):
    """The asynchronous save's group of its own takes train.collective_timeout_s, not torch's 30 min
    default: a save thread waiting on a lost peer would otherwise hold the rank's exit that long."""
    assert [r["timeout_s"] for r in spawn_ranks(async_group_worker, tmp_path, world=WORLD)] == [5.0, 5.0]
