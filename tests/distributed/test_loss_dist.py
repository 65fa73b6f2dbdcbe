"""Losses on 2 gloo ranks (each half the batch) == one process on the whole batch, and == open_clip.

One spawn computes every configuration on both ranks; the tests compare the saved values.
"""
import itertools
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from clipscale.loss import LossConfig, contrastive_loss
from tests.helpers import spawn_ranks

pytestmark = pytest.mark.slow

WORLD, B_LOCAL, D = 2, 7, 8
CONFIGS = {f"{kind}-{'local' if local else 'global'}-{'tiled' if tiled else 'dense'}":
           LossConfig(kind=kind, local_loss=local, tiled=tiled, tile_size=3)
           for kind, local, tiled in itertools.product(["clip", "siglip"], [False, True], [False, True])}
OPEN_CLIP = {  # our configuration -> the open_clip loss with the same semantics
    "clip-global-dense": lambda r: ClipLoss(local_loss=False, gather_with_grad=True, rank=r, world_size=WORLD),
    "clip-global-tiled": lambda r: ClipLoss(local_loss=False, gather_with_grad=True, rank=r, world_size=WORLD),
    "clip-local-dense": lambda r: ClipLoss(local_loss=True, gather_with_grad=True, rank=r, world_size=WORLD),
    "clip-local-tiled": lambda r: ClipLoss(local_loss=True, gather_with_grad=True, rank=r, world_size=WORLD),
    "siglip-local-dense": lambda r: SigLipLoss(rank=r, world_size=WORLD),
    "siglip-local-tiled": lambda r: SigLipLoss(rank=r, world_size=WORLD),
}


def global_inputs() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(WORLD * B_LOCAL, D, generator=gen, dtype=torch.float64), dim=1)
    text = F.normalize(image + 0.7 * torch.randn(WORLD * B_LOCAL, D, generator=gen, dtype=torch.float64), dim=1)
    return [image, text, torch.tensor(6.0, dtype=torch.float64), torch.tensor(-2.5, dtype=torch.float64)]


def value_and_grads(fn, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    leaves = [t.clone().requires_grad_() for t in tensors]
    loss = fn(*leaves)
    loss.backward()
    return [loss.detach()] + [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]


def loss_fn(name: str, cfg_or_module):
    """Call a clipscale config or an open_clip module; CLIP runs without a bias, SigLIP with one."""
    def call(image, text, scale, bias):
        bias = bias if name.startswith("siglip") else None
        if isinstance(cfg_or_module, LossConfig):
            return contrastive_loss(cfg_or_module, image, text, scale, bias)
        return cfg_or_module(image, text, scale, bias) if bias is not None else cfg_or_module(image, text, scale)
    return call


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    image, text, scale, bias = global_inputs()
    mine = [image[rank * B_LOCAL:(rank + 1) * B_LOCAL], text[rank * B_LOCAL:(rank + 1) * B_LOCAL], scale, bias]
    results = {name: value_and_grads(loss_fn(name, cfg), mine) for name, cfg in CONFIGS.items()}
    results.update({f"open_clip:{name}": value_and_grads(loss_fn(name, make(rank)), mine)
                    for name, make in OPEN_CLIP.items()})
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return spawn_ranks(worker, tmp_path_factory.mktemp("loss_dist"), world=WORLD)


def single_process_reference(kind: str) -> list[torch.Tensor]:
    """The global-batch loss on one process, written with torch's dense primitives."""
    def loss(image, text, scale, bias):
        if kind == "clip":
            logits = scale * image @ text.T
            labels = torch.arange(len(logits))
            return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        logits = scale * image @ text.T + bias
        signs = 2 * torch.eye(len(logits), dtype=logits.dtype) - 1
        return -F.logsigmoid(signs * logits).sum() / len(logits)
    return value_and_grads(loss, global_inputs())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_two_ranks_equal_one_process_on_the_whole_batch(ranks, name):
    """mean_r loss_r = L; rank r's feature gradient is WORLD * dL/dx_r (DDP then averages by WORLD)."""
    loss, d_image, d_text, d_scale, d_bias = single_process_reference(name.split("-")[0])
    got = [r[name] for r in ranks]
    opts = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.stack([g[0] for g in got]).mean(), loss, **opts)
    torch.testing.assert_close(torch.cat([g[1] for g in got]) / WORLD, d_image, **opts)
    torch.testing.assert_close(torch.cat([g[2] for g in got]) / WORLD, d_text, **opts)
    torch.testing.assert_close(torch.stack([g[3] for g in got]).mean(), d_scale, **opts)
    torch.testing.assert_close(torch.stack([g[4] for g in got]).mean(), d_bias, **opts)


@pytest.mark.parametrize("name", list(OPEN_CLIP))
def test_each_rank_equals_open_clip(ranks, name):
    for rank in range(WORLD):
        for ours, theirs in zip(ranks[rank][name], ranks[rank][f"open_clip:{name}"]):
            torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
