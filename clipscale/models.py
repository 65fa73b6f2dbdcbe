"""Model construction through open_clip (and timm image towers): architecture, transforms, tokenizer.

What the model *is* lives here; how it is sharded and wrapped lives in parallel.py, what it costs
in compute.py (which imports this module, never the reverse).
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Callable

import open_clip
import timm
import timm.data
import torch

from clipscale.config import ConfigError, ModelConfig

CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(CONFIG_DIR)  # clipscale's own architectures next to open_clip's
# open_clip's 0-d parameters are stored with shape (1,): FSDP2 cannot shard 0-d tensors, and one
# shape for every parallelism keeps checkpoints portable between DDP and FSDP2.
SCALAR_PARAMETERS = ("logit_scale", "logit_bias")
# Heads of clipscale's own configs scale with width at this fixed head dimension.
HEAD_WIDTH = 32
# Overrides that reshape open_clip's own ViT and mean nothing for a timm tower.
VIT_OVERRIDES = ("image_size", "patch_size", "vision_width", "vision_layers")


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
    config: ModelConfig  # what the model was built from (compute counts are cached per config)


def _merge(base: dict, table: dict) -> dict:
    """`base` with `table` written over it, nested tables merged key by key."""
    out = copy.deepcopy(base)
    for key, value in table.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _base_architecture(cfg: ModelConfig) -> dict[str, Any]:
    base = open_clip.get_model_config(cfg.name)
    if base is None and cfg.architecture is None:
        raise ConfigError(
            f"model.name='{cfg.name}' is not an open_clip architecture; choose one of "
            f"open_clip.list_models() or {sorted(p.stem for p in CONFIG_DIR.glob('*.json'))}, "
            f"or describe it in a [model.architecture] table"
        )
    arch = _merge(base or {}, cfg.architecture or {})
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in arch]
    if missing:
        raise ConfigError(
            f"model.architecture for '{cfg.name}' lacks {missing}; a name open_clip does not know needs "
            f"a complete open_clip config (embed_dim, vision_cfg, text_cfg)"
        )
    if cfg.timm_image_tower is not None:
        set_overrides = [f"model.{k}" for k in VIT_OVERRIDES if getattr(cfg, k) is not None]
        if set_overrides:
            raise ConfigError(f"{set_overrides} reshape open_clip's ViT and do not apply to "
                              f"model.timm_image_tower='{cfg.timm_image_tower}'; unset them")
        arch["vision_cfg"] = {
            "timm_model_name": cfg.timm_image_tower, "timm_pool": "", "timm_proj": "linear",
            "image_size": timm_data_config(cfg.timm_image_tower)["input_size"][-1],
        }
    return arch


def timm_data_config(arch: str) -> dict[str, Any]:
    """timm's evaluation data config (input_size, mean, std, interpolation, crop_pct, crop_mode) of `arch`.

    `arch` may carry a pretrained tag (`vit_medium_patch16_reg4_gap_256.sbb_in1k`) choosing its config.
    """
    if not timm.is_model(arch):
        raise ConfigError(f"model.timm_image_tower='{arch}' is not a timm model; see timm.list_models()")
    pretrained_cfg = timm.models.get_pretrained_cfg(arch) or timm.models.get_pretrained_cfg(arch.split(".")[0])
    if pretrained_cfg is None:
        raise ConfigError(f"model.timm_image_tower='{arch}' has no timm data config; "
                          f"choose one of timm.list_pretrained('{arch.split('.')[0]}*')")
    return timm.data.resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict())


def resolve_architecture(cfg: ModelConfig) -> dict[str, Any]:
    """The complete open_clip model config dict for `cfg` (name, architecture table, overrides)."""
    arch = _base_architecture(cfg)
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
    if "timm_model_name" in vision:
        vision["timm_model_pretrained"] = False  # weights come only from model.pretrained
    else:
        _check_divisible(vision, text)
    if "hf_model_name" in text:
        text["hf_model_pretrained"] = False
    return arch


def _check_divisible(vision: dict, text: dict) -> None:
    if text["width"] % text["heads"]:
        raise ConfigError(f"model.text_width={text['width']} must be a multiple of {text['heads']} heads")
    if isinstance(vision["layers"], (list, tuple)):  # a ResNet image tower: no patches or heads
        return
    if vision["image_size"] % vision["patch_size"]:
        raise ConfigError(
            f"model.image_size={vision['image_size']} is not a multiple of "
            f"model.patch_size={vision['patch_size']}"
        )
    head_width = vision.get("head_width", 64)
    if vision["width"] % head_width:
        raise ConfigError(f"model.vision_width={vision['width']} must be a multiple of {head_width}")


def create_model(cfg: ModelConfig, *, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The open_clip model of `cfg`, random or from the local `cfg.pretrained` file (never downloaded).

    On the meta device it allocates nothing: compute.py counts full-size models that way.
    """
    arch = resolve_architecture(cfg)
    if cfg.pretrained is not None and not Path(cfg.pretrained).is_file():
        raise ConfigError(f"model.pretrained={cfg.pretrained!r} is not a file (weights are never downloaded)")
    custom_text = arch.pop("custom_text", False) or "hf_model_name" in arch["text_cfg"]
    model_class = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    with torch.device(device):
        model = model_class(**arch, output_dict=True)
    if cfg.pretrained is not None:
        open_clip.load_checkpoint(model, cfg.pretrained, strict=True)
    if cfg.lock_image:
        model.lock_image_tower()
    for name in SCALAR_PARAMETERS:
        param = getattr(model, name, None)
        if param is not None:
            setattr(model, name, torch.nn.Parameter(param.detach().reshape(1)))
    return model


def image_preprocess_config(cfg: ModelConfig) -> dict[str, Any]:
    """Evaluation preprocessing of `cfg`'s image tower: open_clip's ViT defaults, or the timm tower's own."""
    vision = resolve_architecture(cfg)["vision_cfg"]
    size = vision["image_size"]
    if "timm_model_name" in vision:
        return {**timm_data_config(vision["timm_model_name"]), "input_size": (3, size, size)}
    # open_clip's defaults: OpenAI CLIP statistics, bicubic, no crop margin
    return {"input_size": (3, size, size), "mean": open_clip.OPENAI_DATASET_MEAN,
            "std": open_clip.OPENAI_DATASET_STD, "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center"}


def _tokenizer(text_cfg: dict[str, Any]) -> Callable[[list[str]], torch.Tensor]:
    # open_clip.get_tokenizer looks configs up by name; a recipe's own architecture has no name there.
    kwargs = dict(text_cfg.get("tokenizer_kwargs", {}), context_length=text_cfg["context_length"])
    if "hf_tokenizer_name" in text_cfg:
        return open_clip.HFTokenizer(text_cfg["hf_tokenizer_name"], **kwargs)
    return open_clip.SimpleTokenizer(**kwargs)


def build_model(cfg: ModelConfig, *, device: torch.device | str = "cpu") -> ModelBundle:
    """Build the model of `cfg` with its evaluation transform and tokenizer (no weights are downloaded)."""
    model = create_model(cfg, device=device)
    data_cfg = image_preprocess_config(cfg)
    preprocess_val = timm.data.create_transform(**data_cfg, is_training=False)
    model.visual.preprocess_cfg = {  # what open_clip's exports and tools read
        "size": data_cfg["input_size"][-1], "mean": tuple(data_cfg["mean"]), "std": tuple(data_cfg["std"]),
        "interpolation": data_cfg["interpolation"],
        "resize_mode": "squash" if data_cfg["crop_mode"] == "squash" else "shortest"}
    text_cfg = resolve_architecture(cfg)["text_cfg"]
    return ModelBundle(
        model=model, tokenizer=_tokenizer(text_cfg), preprocess_val=preprocess_val,
        image_size=data_cfg["input_size"][-1], mean=tuple(data_cfg["mean"]), std=tuple(data_cfg["std"]),
        context_length=text_cfg["context_length"], config=cfg,
    )


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
