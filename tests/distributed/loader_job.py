"""Run under torchrun by test_loader_dist: read steps of the real loader on gloo ranks.

Usage: loader_job.py SPEC OUT.json STEPS RESAMPLED [STATE_IN.json] [SAVE_AT]
Writes (rank 0) the global batch keys per step (ranks concatenated) and, when SAVE_AT is given,
the job's merged loader state after that many steps.
"""
import json
import sys

import open_clip
import torch.distributed as dist

from clipscale.data.config import DataConfig
from clipscale.data.pipeline import build_train_loader
from clipscale.train import global_loader_state


def main(spec, out, steps, resampled, state_in=None, save_at=None):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = DataConfig(train_shards=spec, num_streams=4, workers=4 // world, shuffle_buffer=16, block_shards=1,
                     resampled=resampled == "1")
    loader = build_train_loader(cfg, tokenizer=open_clip.get_tokenizer("ViT-B-32"), image_size=16,
                                batch_size=8 // world, rank=rank, world_size=world, seed=0)
    if state_in:
        with open(state_in) as f:
            loader.load_state_dict(json.load(f))
    batches, state, it = [], None, iter(loader)
    for step in range(int(steps)):
        keys = [None] * world
        dist.all_gather_object(keys, next(it).keys)
        batches.append([k for part in keys for k in part])
        if save_at is not None and step + 1 == int(save_at):
            state = global_loader_state(loader)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"batches": batches, "state": state}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
