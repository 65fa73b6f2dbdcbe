"""Shard specs as people write them, on 2 gloo ranks: rank 0 lists a directory or glob once and every rank
uses its list, in sorted order; a glob matching nothing fails on every rank, naming it."""
import os
from pathlib import Path

import fsspec
import open_clip
import torch
import torch.distributed as dist

from clipscale.data.config import DataConfig
from clipscale.data.pipeline import build_train_loader
from clipscale.data.shards import DataError
from tests.helpers import spawn_ranks
from tests.shard_kit import write_dataset

SIZES = [3, 5, 4, 6]


def shard_urls(spec: str) -> list[str] | str:
    cfg = DataConfig(train_shards=spec, num_streams=2, workers=0)
    try:
        loader = build_train_loader(cfg, tokenizer=open_clip.get_tokenizer("ViT-B-32"), image_size=16, batch_size=2,
                                    rank=dist.get_rank(), world_size=2, seed=0)
    except DataError as e:
        return f"DataError: {e}"
    return loader.plan.urls


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        if rank == 0:  # a memory:// filesystem lives in one process: only rank 0 can list these shards
            fs = fsspec.filesystem("memory")
            for path in sorted(Path(out_dir, "shards").iterdir(), reverse=True):  # written in reverse order
                fs.pipe(f"/mem_shards/{path.name}", path.read_bytes())
        result = {spec: shard_urls(spec) for spec in (f"{out_dir}/shards", f"{out_dir}/shards/*.tar",
                                                      "memory://mem_shards/*.tar", f"{out_dir}/nowhere/*.tar")}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_rank0_lists_the_shards_once_for_every_rank(tmp_path):
    write_dataset(tmp_path / "shards", SIZES)
    ranks = spawn_ranks(worker, tmp_path, world=2)
    assert ranks[0] == ranks[1]
    local = [str(tmp_path / f"shards/{i:06d}.tar") for i in range(len(SIZES))]
    assert ranks[0][f"{tmp_path}/shards"] == ranks[0][f"{tmp_path}/shards/*.tar"] == local
    assert ranks[0]["memory://mem_shards/*.tar"] == [f"memory:///mem_shards/{i:06d}.tar" for i in range(len(SIZES))]
    assert ranks[0][f"{tmp_path}/nowhere/*.tar"] == (
        f"DataError: data.train_shards='{tmp_path}/nowhere/*.tar': {tmp_path}/nowhere/*.tar matches no file; check "
        "the path, or give a directory of shards, a glob such as dir/*.tar or a brace spec such as "
        "dir/{000000..000009}.tar")
