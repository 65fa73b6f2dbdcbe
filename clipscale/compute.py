"""Parameters and forward compute per image-text pair, in two named conventions, and training FLOPs.

- `gmacs_per_sample` counts every multiply-accumulate of the forward pass, attention score (QK^T)
  and value (AV) matmuls included: the convention of the CLIP scaling-law literature (Cherti et
  al. 2023) and of clipscale.scaling.
- `gmacs_per_sample_no_attn` counts linear layers and the patch embedding only: the convention of
  timm's model cards, whose counter does not see fused attention.

Counts come from torch's FLOP counter running the model itself on the meta device (nothing is
allocated, so ViT-bigG counts as fast as a tiny model), split by operator: linear layers and
projections run as mm/addmm, the patch embedding as a convolution, attention as bmm/baddbmm.
They are cached per model config.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math

import torch
from torch.utils.flop_counter import FlopCounterMode

from clipscale.config import ModelConfig, TrainConfig
from clipscale.models import SCALAR_PARAMETERS, ModelBundle, count_params, create_model, resolve_architecture

aten = torch.ops.aten
LINEAR_OPS = (aten.mm, aten.addmm, aten.convolution)
# Fused SDPA kernels are listed so that a model calling them directly is still counted.
ATTENTION_OPS = (aten.bmm, aten.baddbmm, aten._scaled_dot_product_efficient_attention,
                 aten._scaled_dot_product_flash_attention, aten._scaled_dot_product_cudnn_attention)


@dataclasses.dataclass(frozen=True)
class TowerSplit:
    """One quantity for the image tower, the text tower and the whole model."""

    image: float
    text: float
    total: float


@dataclasses.dataclass(frozen=True)
class ModelCompute:
    """Size and forward cost of one image-text pair (total params include logit scale and bias)."""

    params: TowerSplit
    gmacs_per_sample: TowerSplit
    """Forward GMACs including attention score and value matmuls (scaling-law convention)."""
    gmacs_per_sample_no_attn: TowerSplit
    """Forward GMACs of linear layers and the patch embedding only (timm model-card convention)."""

    def to_dict(self) -> dict[str, dict[str, float]]:
        return dataclasses.asdict(self)


def model_compute(cfg: ModelConfig) -> ModelCompute:
    """Params and forward GMACs of `cfg`'s model per image-text pair, in both conventions (cached)."""
    # Weights and locking do not change the count; the key makes dict-valued configs hashable.
    counted = dataclasses.replace(cfg, pretrained=None, lock_image=False)
    return _count(json.dumps(dataclasses.asdict(counted), sort_keys=True))


@functools.lru_cache(maxsize=64)
def _count(key: str) -> ModelCompute:
    cfg = ModelConfig(**json.loads(key))
    arch = resolve_architecture(cfg)
    model = create_model(cfg, device="meta").eval()  # eval: patch dropout off, the full sequence counts
    image_size = arch["vision_cfg"]["image_size"]
    image = torch.zeros(1, 3, image_size, image_size, device="meta")
    text = torch.zeros(1, arch["text_cfg"]["context_length"], dtype=torch.long, device="meta")
    image_all, image_linear = _forward_macs(model.encode_image, image)
    text_all, text_linear = _forward_macs(model.encode_text, text)
    params_total = count_params(model)
    params_image = count_params(model.visual)
    params_scalars = sum(p.numel() for n, p in model.named_parameters() if n in SCALAR_PARAMETERS)
    return ModelCompute(
        params=TowerSplit(image=params_image, text=params_total - params_image - params_scalars,
                          total=params_total),
        gmacs_per_sample=TowerSplit(image=image_all / 1e9, text=text_all / 1e9,
                                    total=(image_all + text_all) / 1e9),
        gmacs_per_sample_no_attn=TowerSplit(image=image_linear / 1e9, text=text_linear / 1e9,
                                            total=(image_linear + text_linear) / 1e9),
    )


def gmacs_per_sample(bundle: ModelBundle) -> float:
    """Forward GMACs for one image-text pair including attention (the scaling-law convention)."""
    return model_compute(bundle.config).gmacs_per_sample.total


def gmacs_per_sample_no_attn(bundle: ModelBundle) -> float:
    """Forward GMACs for one image-text pair of linear layers and patch embedding (timm's convention)."""
    return model_compute(bundle.config).gmacs_per_sample_no_attn.total


def _forward_macs(encode, inputs: torch.Tensor) -> tuple[float, float]:
    """(all MACs, linear + convolution MACs) of one forward of `encode` on the meta device.

    On real devices, nn.MultiheadAttention's fused fast path (eval mode under no_grad) and the fused
    SDPA kernels hide attention from the FLOP counter; on the meta device neither applies and
    attention runs as counted bmm.
    """
    with FlopCounterMode(display=False) as counter:
        encode(inputs)
    by_op = counter.get_flop_counts()["Global"]
    unknown = set(by_op) - set(LINEAR_OPS + ATTENTION_OPS)
    if unknown:
        raise NotImplementedError(f"ops {sorted(map(str, unknown))} are neither linear nor attention; "
                                  f"extend clipscale.compute.LINEAR_OPS or ATTENTION_OPS")
    linear = sum(by_op.get(op, 0) for op in LINEAR_OPS)
    return sum(by_op.values()) / 2, linear / 2  # a MAC is 2 FLOPs


def gradcache_chunks(train: TrainConfig, *, world_size: int) -> int:
    """Chunks per rank and step: 1 without gradient caching."""
    if train.chunk_size is None:
        return 1
    return math.ceil(train.global_batch_size // world_size / train.chunk_size)


def model_flops_per_sample(model: ModelConfig) -> float:
    """Model FLOPs of one training step per image-text pair: the numerator of MFU (PaLM, App. B).

    Backward costs ~2x the forward (Kaplan et al. 2020, sec. 2.1), so a trained tower costs 3
    forwards; a locked image tower (LiT) runs forward only. Recomputation is not model work.
    Attention is included (2 FLOPs per MAC of `ModelCompute.gmacs_per_sample`).
    """
    gmacs = model_compute(model).gmacs_per_sample
    return 2e9 * (gmacs.image * (1 if model.lock_image else 3) + gmacs.text * 3)


def hardware_flops_per_sample(model: ModelConfig, train: TrainConfig, *, world_size: int) -> float:
    """FLOPs the devices execute per image-text pair: model FLOPs plus recomputation (HFU's numerator).

    Activation checkpointing recomputes each trained tower's forward once more in backward; the
    gradient cache forwards (K-1)/K of the batch once more without autograd (K chunks per rank,
    see gradcache.py).
    """
    gmacs = model_compute(model).gmacs_per_sample
    recompute = (gmacs.text + (0 if model.lock_image else gmacs.image)) * int(train.grad_checkpointing)
    k = gradcache_chunks(train, world_size=world_size)
    return model_flops_per_sample(model) + 2e9 * (recompute + gmacs.total * (k - 1) / k)
