"""Held-out contrastive loss of a caption set at a fixed batch size: the training objective on unseen pairs.

Each image is paired with its first caption; consecutive pairs in the set's order form batches of
`batch_size` (a last, partial batch is left out: the loss depends on the batch size). Each batch's
loss is `clipscale.loss.contrastive_loss` (CLIP InfoNCE or SigLIP) at the model's temperature and
bias; the metric (`clip_loss` or `siglip_loss`) is their mean. Under torchrun every rank holds all
features and passes its slice of each batch, which the loss gathers: the value equals one process's.
"""
from __future__ import annotations

import torch

from clipscale import dist
from clipscale.config import ConfigError
from clipscale.evaluate.datasets import EvalDataError
from clipscale.loss import LossConfig, contrastive_loss


def loss_kind_of(model: torch.nn.Module) -> str:
    """"siglip" for a model with a logit bias (SigLIP's), else "clip": for weights outside a run."""
    return "siglip" if getattr(model, "logit_bias", None) is not None else "clip"


def heldout_loss(image_features: torch.Tensor, text_features: torch.Tensor, text_image_index: torch.Tensor, *,
                 logit_scale: torch.Tensor, logit_bias: torch.Tensor | None, kind: str, batch_size: int,
                 device: torch.device, name: str) -> dict[str, float]:
    """{"<kind>_loss": mean batch loss} from unit-norm image (N, D) and caption (T, D) features.

    Caption t describes image `text_image_index[t]` (non-decreasing); logit_scale is exp()'d.
    Collective under torchrun (every rank calls it with the same features).
    """
    n, world = len(image_features), dist.world_size()
    if batch_size % world:
        raise ConfigError(f"eval.loss_batch_size={batch_size} is not divisible by the {world} processes: "
                          f"set a multiple of {world}")
    if n < batch_size:
        raise EvalDataError(f"{name} has {n} images, fewer than eval.loss_batch_size={batch_size}: set "
                            f"eval.loss_batch_size to at most {n}, or drop the task contrastive_loss")
    first_caption = torch.searchsorted(text_image_index, torch.arange(n))  # (N,) each image's first caption
    texts = text_features[first_caption]  # (N, D)
    per_rank, rank = batch_size // world, dist.rank()
    cfg, scale = LossConfig(kind=kind), logit_scale.detach().to(device)
    bias = None if logit_bias is None else logit_bias.detach().to(device)
    losses = []
    with torch.no_grad():
        for start in range(0, n - batch_size + 1, batch_size):
            mine = slice(start + rank * per_rank, start + (rank + 1) * per_rank)  # gathered in batch order
            losses.append(contrastive_loss(cfg, image_features[mine].to(device), texts[mine].to(device), scale, bias))
    return {f"{kind}_loss": torch.stack(losses).mean().item()}  # host sync, once per set
