"""Gradient caching on 2 gloo ranks (DDP and FSDP2) == one process on the concatenated batch.

float64, dropout and patch dropout on. Each rank seeds its RNG with SEED + rank; the reference
forwards rank 0's chunks from SEED and rank 1's from SEED + 1, so both draw identical masks.
"""
import os

import pytest
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from tests.models import tiny_clip
from clipscale.gradcache import gradcache_step
from clipscale.loss import LossConfig, contrastive_loss
from tests.helpers import spawn_ranks

pytestmark = pytest.mark.slow

WORLD, B_LOCAL, CHUNK, SEED = 2, 5, 2, 11
CASES = {  # name -> (wrapper, loss config)
    "ddp-clip-global": ("ddp", LossConfig(kind="clip")),
    "ddp-siglip-local-tiled": ("ddp", LossConfig(kind="siglip", local_loss=True, tiled=True, tile_size=3)),
    "fsdp2-clip-local": ("fsdp2", LossConfig(kind="clip", local_loss=True)),
}


def build(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = tiny_clip(dropout=0.1, patch_dropout=0.25, logit_bias=-2.0 if kind == "siglip" else None)
    for name in ("logit_scale", "logit_bias"):  # fully_shard refuses 0-d parameters
        if getattr(model, name, None) is not None:
            setattr(model, name, torch.nn.Parameter(getattr(model, name).detach().reshape(1)))
    return model.double().train()


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    n = WORLD * B_LOCAL
    return torch.randn(n, 3, 16, 16, generator=gen, dtype=torch.float64), torch.randint(0, 100, (n, 8), generator=gen)


def wrap(model: torch.nn.Module, wrapper: str) -> torch.nn.Module:
    if wrapper == "ddp":
        return DistributedDataParallel(model)
    for block in [*model.visual.transformer.resblocks, *model.transformer.resblocks]:
        fully_shard(block)
    return fully_shard(model)


def full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameter gradients by open_clip name, unsharded (FSDP2 grads are DTensors)."""
    grads = {}
    for name, param in model.named_parameters():
        grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
        grads[name.removeprefix("module.")] = grad.detach().clone()
    return grads


def count_allreduces(state: dict, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """A real DDP comm hook: DDP's default all-reduce, counted (to check no_sync is honoured)."""
    state["calls"] += 1
    return default_hooks.allreduce_hook(None, bucket)


def plain_backward(model: torch.nn.Module, images: torch.Tensor, texts: torch.Tensor) -> None:
    out = model(images, texts)
    sum(out[k].sum() for k in out if out[k] is not None).backward()
    model.zero_grad(set_to_none=True)


def syncs_per_backward(model: DistributedDataParallel, images: torch.Tensor, texts: torch.Tensor) -> int:
    """Bucket all-reduces in one plain forward/backward of this DDP model."""
    state = {"calls": 0}
    model.register_comm_hook(state, count_allreduces)
    plain_backward(model, images, texts)
    return state["calls"]


def reduce_scatters(run) -> tuple[object, int]:
    """`run()`'s result and the reduce-scatter collectives it issued, counted by the profiler at the
    c10d op FSDP2 calls (one per sharding unit per synchronised backward)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = run()
    return result, sum(e.name.startswith("c10d::") and "reduce_scatter" in e.name for e in prof.events())


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    images, texts = global_batch()
    mine = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    results = {}
    for name, (wrapper, cfg) in CASES.items():
        model = wrap(build(cfg.kind), wrapper)
        state = {"calls": 0}
        if wrapper == "ddp":
            expected_syncs = syncs_per_backward(wrap(build(cfg.kind), wrapper), images[mine], texts[mine])
            model.register_comm_hook(state, count_allreduces)
        else:
            _, expected_syncs = reduce_scatters(lambda: plain_backward(wrap(build(cfg.kind), wrapper),
                                                                       images[mine], texts[mine]))
        torch.manual_seed(SEED + rank)
        loss, scatters = reduce_scatters(
            lambda: gradcache_step(model, images[mine], texts[mine], chunk_size=CHUNK, loss_cfg=cfg))
        results[name] = {"loss": loss, "grads": full_grads(model),
                         "syncs": (state["calls"] if wrapper == "ddp" else scatters, expected_syncs)}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return spawn_ranks(worker, tmp_path_factory.mktemp("gradcache_dist"), world=WORLD)


def single_process_reference(cfg: LossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One graph over every rank's chunks (each rank's RNG stream), the global dense loss, one backward."""
    model = build(cfg.kind)
    images, texts = global_batch()
    outs = []
    for rank in range(WORLD):
        torch.manual_seed(SEED + rank)
        mine = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        outs += [model(i, t) for i, t in zip(images[mine].split(CHUNK), texts[mine].split(CHUNK))]
    dense = LossConfig(kind=cfg.kind)  # one process: the global batch, materialised logits
    loss = contrastive_loss(dense, torch.cat([o["image_features"] for o in outs]),
                            torch.cat([o["text_features"] for o in outs]), outs[0]["logit_scale"],
                            outs[0].get("logit_bias"))
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(CASES))
def test_two_rank_gradcache_equals_one_process(ranks, name):
    want_loss, want = single_process_reference(CASES[name][1])
    torch.testing.assert_close(torch.stack([r[name]["loss"] for r in ranks]).mean(), want_loss,
                               rtol=1e-12, atol=0)
    scale = torch.cat([g.flatten() for g in want.values()]).norm()
    for rank in ranks:
        for param, g in want.items():
            err = (rank[name]["grads"][param] - g).norm()
            assert err <= 1e-8 * max(g.norm(), 1e-6 * scale), f"{param}: |diff|={err:.3e} |ref|={g.norm():.3e}"


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_sync_once_per_step(ranks, name):
    """B_LOCAL / CHUNK = 3 chunks, yet only the last backward synchronises: DDP all-reduces as many
    buckets, and FSDP2 reduce-scatters as many sharding units, as one plain forward/backward."""
    for rank in ranks:
        calls, per_backward = rank[name]["syncs"]
        assert calls == per_backward > 0
