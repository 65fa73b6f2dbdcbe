"""A non-finite step is skipped by every rank alike, with no collective of its own (2 gloo ranks).

Only rank 1 gets a NaN image. The skip flag comes from the global gradient norm, which DDP and
FSDP2 make identical on every rank, and gates the fused AdamW kernel on the device; so both
ranks must skip the step and leave every parameter (FSDP2: every shard) as it was.
"""
import os

import pytest
import torch
import torch.distributed as dist

from clipscale.config import load_config
from clipscale.dist import DistInfo
from clipscale.metrics import StepTimer
from clipscale.models import build_model
from clipscale.optim import build_optimizer
from clipscale.parallel import parallelize
from clipscale.train import train_step
from tests.helpers import spawn_ranks

pytestmark = pytest.mark.slow

WORLD, B_LOCAL = 2, 4
PARALLEL = ("ddp", "fsdp")


def local_params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [getattr(p, "_local_tensor", p).detach().clone() for p in model.parameters()]


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    cpu = torch.device("cpu")
    results = {}
    for parallel in PARALLEL:
        cfg = load_config(None, [f"train.parallel={parallel}", f"train.global_batch_size={WORLD * B_LOCAL}",
                                 "model.vision_width=32", "model.text_width=32", "model.embed_dim=16"])
        torch.manual_seed(0)
        bundle = build_model(cfg.model)
        model = parallelize(bundle.model, cfg.train, DistInfo(rank=rank, world_size=WORLD))
        optimizer = build_optimizer(model, cfg.optim)
        texts = torch.randint(0, 1000, (B_LOCAL, bundle.context_length))
        outcome = []
        for bad_rank in (1, None):  # rank 1 alone sees a NaN image, then a finite step
            images = torch.randn(B_LOCAL, 3, bundle.image_size, bundle.image_size)
            if rank == bad_rank:
                images[0] = float("nan")
            before = local_params(model)
            result = train_step(model, images, texts, optimizer=optimizer, cfg=cfg, device=cpu,
                                timer=StepTimer(cpu))
            changed = [not torch.equal(a, b) for a, b in zip(before, local_params(model)) if a.numel()]
            outcome.append((bool(result.skipped), any(changed)))
        results[parallel] = outcome
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return spawn_ranks(worker, tmp_path_factory.mktemp("step_skip"), world=WORLD)


@pytest.mark.parametrize("parallel", PARALLEL)
def test_every_rank_skips_a_step_that_one_rank_found_non_finite(ranks, parallel):
    for rank in ranks:
        # (skipped, any parameter changed): the NaN step is skipped, the finite step updates
        assert rank[parallel] == [(True, False), (False, True)]
