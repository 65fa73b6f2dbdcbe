"""Contrastive losses as pure functions of features, scale, bias and the process group."""
from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F

from clipscale.dist import gather_with_grad


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossConfig:
    kind: Literal["clip", "siglip"] = "clip"
    """CLIP InfoNCE (softmax) or SigLIP (sigmoid) loss."""
    local_loss: bool = False
    """Each rank computes its own rows against all gathered columns (open_clip --local-loss)."""


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    local_loss: bool = False,
) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch (Radford et al. 2021, eq. in Fig. 3).

    image_features, text_features: (B_local, D), L2-normalised; logit_scale: scalar (already exp'd).
    Returns the scalar loss of this rank; its mean over ranks is the global-batch loss.
    """
    all_image = gather_with_grad(image_features)  # (B_global, D)
    all_text = gather_with_grad(text_features)  # (B_global, D)
    if local_loss:
        b = image_features.shape[0]
        offset = b * (torch.distributed.get_rank() if all_image.shape[0] != b else 0)
        logits_per_image = logit_scale * image_features @ all_text.T  # (B_local, B_global)
        logits_per_text = logit_scale * text_features @ all_image.T  # (B_local, B_global)
        labels = torch.arange(b, device=image_features.device) + offset
    else:
        logits_per_image = logit_scale * all_image @ all_text.T  # (B_global, B_global)
        logits_per_text = logits_per_image.T
        labels = torch.arange(all_image.shape[0], device=image_features.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
