"""Model construction through open_clip: architecture, transforms, tokenizer, size and compute.

What the model *is* lives here; how it is sharded and wrapped lives in parallel.py.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Callable

import open_clip
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from clipscale.config import ConfigError, ModelConfig

CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(CONFIG_DIR)  # clipscale's own architectures next to open_clip's
# open_clip's 0-d parameters are stored with shape (1,): FSDP2 cannot shard 0-d tensors, and one
# shape for every parallelism keeps checkpoints portable between DDP and FSDP2.
SCALAR_PARAMETERS = ("logit_scale", "logit_bias")
# Heads of clipscale's own configs scale with width at this fixed head dimension.
HEAD_WIDTH = 32


@dataclasses.dataclass(frozen=True)
class ModelBundle:
    """A model with what is needed to feed it: uint8 -> float normalisation stats and a tokenizer."""

    model: torch.nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    preprocess_val: Callable  # PIL image -> normalised float tensor (evaluation)
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    context_length: int


def resolve_architecture(cfg: ModelConfig) -> dict[str, Any]:
    """The open_clip model config dict for `cfg.name` with the overrides of `cfg` applied."""
    base = open_clip.get_model_config(cfg.name)
    if base is None:
        raise ConfigError(
            f"model.name='{cfg.name}' is not an open_clip architecture; "
            f"choose one of open_clip.list_models() or {sorted(p.stem for p in CONFIG_DIR.glob('*.json'))}"
        )
    arch = copy.deepcopy(base)
    vision, text = arch["vision_cfg"], arch["text_cfg"]
    own = (CONFIG_DIR / f"{cfg.name}.json").exists()
    overrides = {
        ("embed_dim",): cfg.embed_dim,
        ("vision_cfg", "image_size"): cfg.image_size,
        ("vision_cfg", "patch_size"): cfg.patch_size,
        ("vision_cfg", "width"): cfg.vision_width,
        ("vision_cfg", "layers"): cfg.vision_layers,
        ("text_cfg", "width"): cfg.text_width,
        ("text_cfg", "layers"): cfg.text_layers,
        ("text_cfg", "context_length"): cfg.context_length,
    }
    for path, value in overrides.items():
        if value is not None:
            node = arch
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = value
    if cfg.text_width is not None and own:
        text["heads"] = max(1, cfg.text_width // HEAD_WIDTH)
    if cfg.patch_dropout:
        vision["patch_dropout"] = cfg.patch_dropout
    if cfg.init_logit_scale is not None:
        arch["init_logit_scale"] = cfg.init_logit_scale
    if cfg.init_logit_bias is not None:
        arch["init_logit_bias"] = cfg.init_logit_bias
    _check_divisible(vision, text)
    return arch


def _check_divisible(vision: dict, text: dict) -> None:
    if vision["image_size"] % vision["patch_size"]:
        raise ConfigError(
            f"model.image_size={vision['image_size']} is not a multiple of "
            f"model.patch_size={vision['patch_size']}"
        )
    head_width = vision.get("head_width", 64)
    if vision["width"] % head_width:
        raise ConfigError(f"model.vision_width={vision['width']} must be a multiple of {head_width}")
    if text["width"] % text["heads"]:
        raise ConfigError(f"model.text_width={text['width']} must be a multiple of {text['heads']} heads")


def build_model(cfg: ModelConfig, *, device: torch.device | str = "cpu") -> ModelBundle:
    """Build a randomly initialised open_clip model (no weights are downloaded)."""
    arch = resolve_architecture(cfg)
    if cfg.pretrained is not None and not Path(cfg.pretrained).is_file():
        raise ConfigError(f"model.pretrained={cfg.pretrained!r} is not a file (weights are never downloaded)")
    model = open_clip.create_model(
        cfg.name, pretrained=cfg.pretrained, device=device, output_dict=True,
        embed_dim=arch.pop("embed_dim"), **arch,
    )
    if cfg.lock_image:
        model.lock_image_tower()
    for name in SCALAR_PARAMETERS:
        param = getattr(model, name, None)
        if param is not None:
            setattr(model, name, torch.nn.Parameter(param.detach().reshape(1)))
    pp = model.visual.preprocess_cfg
    image_size = arch["vision_cfg"]["image_size"]
    preprocess_val = open_clip.image_transform(
        image_size, is_train=False, mean=pp["mean"], std=pp["std"],
        interpolation=pp["interpolation"], resize_mode=pp["resize_mode"],
    )
    context_length = arch["text_cfg"]["context_length"]
    tokenizer = open_clip.get_tokenizer(cfg.name, context_length=context_length)
    return ModelBundle(
        model=model, tokenizer=tokenizer, preprocess_val=preprocess_val, image_size=image_size,
        mean=tuple(pp["mean"]), std=tuple(pp["std"]), context_length=context_length,
    )


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def gmacs_per_sample(bundle: ModelBundle) -> float:
    """Forward GMACs for one image-text pair, counted by torch's FLOP counter (MACs = FLOPs / 2)."""
    model = bundle.model
    param = next(model.parameters())
    image = torch.zeros(1, 3, bundle.image_size, bundle.image_size, device=param.device, dtype=param.dtype)
    text = torch.zeros(1, bundle.context_length, dtype=torch.long, device=param.device)
    was_training = model.training
    model.eval()  # patch dropout off: count the full sequence
    # The fused attention kernels are invisible to the FLOP counter; the math kernel is plain
    # matmuls, so attention scores and values are counted too.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(image, text)
    model.train(was_training)
    return counter.get_total_flops() / 2 / 1e9
