"""Compute accounting against analytic hand counts on full-size architectures (counted on the meta device)."""
import dataclasses

import pytest

from clipscale.compute import (gmacs_per_sample, gmacs_per_sample_no_attn, hardware_flops_per_sample, model_compute,
                               model_flops_per_sample)
from clipscale.config import ModelConfig, TrainConfig
from clipscale.models import build_model


def linear_macs(*, tokens: int, width: int, layers: int, mlp_ratio: float = 4.0) -> int:
    """qkv (3 w^2), out projection (w^2) and MLP (2 * ratio * w^2) per token and layer."""
    return layers * tokens * width * width * int(4 + 2 * mlp_ratio)


def attention_macs(*, tokens: int, width: int, layers: int) -> int:
    """Scores QK^T and values AV: tokens^2 * width each per layer."""
    return layers * 2 * tokens * tokens * width


# (name, image size, patch, vision width, vision layers, mlp ratio, text width, text layers, embed dim)
FULL_SIZE = [
    ("ViT-B-16", 224, 16, 768, 12, 4.0, 512, 12, 512),
    ("ViT-L-14", 224, 14, 1024, 24, 4.0, 768, 12, 768),
]


@pytest.mark.parametrize("name,size,patch,vw,vl,ratio,tw,tl,dim", FULL_SIZE)
def test_both_conventions_match_hand_counts_at_full_size(name, size, patch, vw, vl, ratio, tw, tl, dim):
    c = model_compute(ModelConfig(name=name))
    patches = (size // patch) ** 2
    image_linear = (patches * 3 * patch * patch * vw  # patch embedding
                    + linear_macs(tokens=patches + 1, width=vw, layers=vl, mlp_ratio=ratio)
                    + vw * dim)  # class token -> embedding
    text_linear = linear_macs(tokens=77, width=tw, layers=tl) + tw * dim
    image_attn = attention_macs(tokens=patches + 1, width=vw, layers=vl)
    text_attn = attention_macs(tokens=77, width=tw, layers=tl)
    assert c.gmacs_per_sample_no_attn.image * 1e9 == pytest.approx(image_linear, rel=1e-12)
    assert c.gmacs_per_sample_no_attn.text * 1e9 == pytest.approx(text_linear, rel=1e-12)
    assert c.gmacs_per_sample.image * 1e9 == pytest.approx(image_linear + image_attn, rel=1e-12)
    assert c.gmacs_per_sample.text * 1e9 == pytest.approx(text_linear + text_attn, rel=1e-12)
    assert c.gmacs_per_sample.total == pytest.approx(c.gmacs_per_sample.image + c.gmacs_per_sample.text)
    assert c.params.total == c.params.image + c.params.text + 1  # + logit scale


# timm model cards (huggingface.co/timm/<arch>): params (M) and GMACs of the image classifier.
TIMM_CARDS = [
    ("vit_base_patch16_clip_384", 86.9, 49.4),
    ("vit_base_patch16_384", 86.9, 49.4),
    ("vit_medium_patch16_reg4_gap_256", 38.9, 9.9),
]


@pytest.mark.parametrize("arch,params_m,gmacs", TIMM_CARDS)
def test_timm_towers_agree_with_model_cards(arch, params_m, gmacs):
    c = model_compute(ModelConfig(name="ViT-B-16", timm_image_tower=arch))
    assert c.params.image / 1e6 == pytest.approx(params_m, rel=0.02)
    assert c.gmacs_per_sample_no_attn.image == pytest.approx(gmacs, rel=0.02)
    assert c.gmacs_per_sample.image > c.gmacs_per_sample_no_attn.image * 1.05  # the attention the cards leave out


def test_bundle_shortcuts_count_the_built_model():
    cfg = ModelConfig(vision_width=32, text_width=32, embed_dim=16)
    bundle = build_model(cfg)
    c = model_compute(cfg)
    assert gmacs_per_sample(bundle) == c.gmacs_per_sample.total
    assert gmacs_per_sample_no_attn(bundle) == c.gmacs_per_sample_no_attn.total
    assert c.params.total == sum(p.numel() for p in bundle.model.parameters())


def test_training_flops_name_every_extra_pass():
    model = ModelConfig(name="ViT-B-16")
    g = model_compute(model).gmacs_per_sample
    plain = TrainConfig(global_batch_size=1024)
    assert model_flops_per_sample(model) == pytest.approx(3 * 2e9 * g.total)
    assert hardware_flops_per_sample(model, plain, world_size=8) == pytest.approx(3 * 2e9 * g.total)
    ckpt = dataclasses.replace(plain, grad_checkpointing=True)
    assert hardware_flops_per_sample(model, ckpt, world_size=8) == pytest.approx(4 * 2e9 * g.total)
    # 128 per rank in 4 chunks: the cache forwards 3 of the 4 chunks once more.
    cached = dataclasses.replace(plain, chunk_size=32)
    assert hardware_flops_per_sample(model, cached, world_size=8) == pytest.approx((3 + 0.75) * 2e9 * g.total)
    locked = dataclasses.replace(model, lock_image=True)
    assert model_flops_per_sample(locked) == pytest.approx(2e9 * (g.image + 3 * g.text))
    assert hardware_flops_per_sample(locked, ckpt, world_size=8) == pytest.approx(2e9 * (g.image + 4 * g.text))
