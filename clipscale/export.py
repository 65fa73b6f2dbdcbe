"""Export a checkpoint to the tools people already use: open_clip (local or hf-hub directory) and timm.

- `export_open_clip`: the whole model as the directory layout of open_clip's Hugging Face Hub
  models (`open_clip_config.json`, safetensors and .bin weights, README.md); it loads as
  `open_clip.create_model("local-dir:DIR")`, and as `hf-hub:ORG/NAME` once uploaded.
- `export_timm`: the image tower as a timm model directory (`config.json`, `model.safetensors`),
  loading as `timm.create_model("local-dir:DIR", pretrained=True)` or `timm.create_model(ARCH, pretrained=True,
  pretrained_cfg_overlay=dict(file=DIR/model.safetensors), num_classes=0, **MODEL_ARGS)` (ARCH and
  MODEL_ARGS are in config.json) with timm's pooled embedding, `forward_features`,
  `forward_head` and `features_only`. open_clip ViT towers are converted with timm's own
  open_clip converter into its CLIP ViT (`vit_*_clip_*`); timm towers are written as they are.

Both write `clipscale_provenance.json`: the run, checkpoint, step, samples seen, params, GMACs per
pair and training data of the weights, the fields of a results row (`ModelInfo`), so that
evaluating an export gives rows that can enter a scaling fit. `load` reads a run directory, a
checkpoint or an open_clip export back as (model, preprocess, tokenizer): `clipscale.load`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable

import safetensors.torch
import timm
import timm.models.vision_transformer as timm_vit
import torch
from open_clip.push_to_hf_hub import generate_readme
from timm.models import save_for_hf

from clipscale.checkpoint import load_model_weights, read_meta, resolve_checkpoint
from clipscale.compute import model_compute
from clipscale.config import Config, ConfigError, ModelConfig, config_from_dict
from clipscale.results import ModelInfo
from clipscale.models import (SCALAR_PARAMETERS, ModelBundle, build_model, count_params, image_preprocess_config,
                              resolve_architecture)

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
PROVENANCE = "clipscale_provenance.json"
# timm's pretrained-config keys naming the source of the template's weights, not of the exported ones.
TIMM_SOURCE_KEYS = ("tag", "license", "hf_hub_id", "url")
# timm's CLIP ViT names by (width, depth) of open_clip's standard sizes.
TIMM_CLIP_SIZES = {(768, 12): "base", (1024, 24): "large", (1280, 32): "huge", (1408, 40): "giant",
                   (1664, 48): "gigantic"}
# open_clip ViT options timm's CLIP ViT does not reproduce.
UNSUPPORTED_VIT = {"attentional_pool": False, "final_ln_after_pool": False, "no_ln_pre": False,
                   "pool_type": "tok", "ls_init_value": None, "pos_embed_type": "learnable"}


def checkpoint_bundle(path: str | Path, *, device: torch.device | str = "cpu") -> tuple[ModelBundle, ModelInfo]:
    """The trained model (eval mode, one process) of a checkpoint or run directory (its latest
    checkpoint), with its provenance."""
    path = resolve_checkpoint(path)
    meta = read_meta(path)
    cfg: Config = config_from_dict(meta["config"])
    bundle = build_model(dataclasses.replace(cfg.model, pretrained=None), device=device)
    load_model_weights(path, bundle.model)
    info = ModelInfo(run=cfg.run.name, model=cfg.model.name, checkpoint=path.name, step=meta["step"],
                     samples_seen=meta["samples_seen"], params=count_params(bundle.model),
                     gmacs_per_sample=model_compute(cfg.model).gmacs_per_sample.total, dataset=cfg.data.dataset_name)
    bundle.model.eval()
    return bundle, info


def export_bundle(directory: str | Path, *, device: torch.device | str = "cpu") -> tuple[ModelBundle, ModelInfo | None]:
    """The model of an open_clip export directory and its provenance (None for one clipscale did not write).

    open_clip reads the architecture of a `local-dir:` name from the directory itself, so nothing is
    registered in open_clip's global model registry.
    """
    directory = Path(directory)
    info = ModelInfo(**json.loads((directory / PROVENANCE).read_text())) if (directory / PROVENANCE).is_file() else None
    cfg = ModelConfig(name=f"local-dir:{directory.resolve()}", pretrained=str(directory / OPEN_CLIP_WEIGHTS[0]))
    bundle = build_model(cfg, device=device)
    bundle.model.eval()
    return bundle, info


def load(target: str | Path, *, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, Callable, Callable]:
    """(model, preprocess, tokenizer) of a run directory (its latest checkpoint), a checkpoint directory
    or an open_clip export directory: `clipscale.load`."""
    path = Path(target)
    if (path / OPEN_CLIP_CONFIG).is_file():
        bundle, _ = export_bundle(path, device=device)
    else:
        try:
            bundle, _ = checkpoint_bundle(path, device=device)
        except FileNotFoundError as e:
            raise ConfigError(f"{target} is neither a run directory with a complete checkpoint, a checkpoint "
                              f"(meta.json) nor an export ({OPEN_CLIP_CONFIG}): {e}") from e
    return bundle.model, bundle.preprocess_val, bundle.tokenizer


def _readable(path: Path) -> None:
    """Give a written file the mode the umask allows (safetensors writes 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    _readable(tmp)
    os.replace(tmp, path)


def _write_provenance(info: ModelInfo, out_dir: Path) -> None:
    (out_dir / PROVENANCE).write_text(json.dumps(dataclasses.asdict(info), indent=2) + "\n")


def export_open_clip(path: str | Path, out_dir: str | Path) -> Path:
    """Write a checkpoint's model as an open_clip (hf-hub layout) directory; returns the directory."""
    bundle, info = checkpoint_bundle(path)
    cfg, model = bundle.config, bundle.model
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # open_clip's own models keep logit scale and bias 0-d.
    state = {k: v.reshape(()) if k in SCALAR_PARAMETERS else v.contiguous() for k, v in model.state_dict().items()}
    _write_atomic(out_dir / OPEN_CLIP_WEIGHTS[0], lambda p: safetensors.torch.save_file(state, str(p)))
    _write_atomic(out_dir / OPEN_CLIP_WEIGHTS[1], lambda p: torch.save(state, p))
    config = {"model_cfg": resolve_architecture(cfg), "preprocess_cfg": model.visual.preprocess_cfg}
    (out_dir / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    card = {"details": {"Architecture": cfg.name, "Trained with": "clipscale"}}
    (out_dir / "README.md").write_text(generate_readme(card, cfg.name))
    _write_provenance(info, out_dir)
    return out_dir


def timm_image_tower(cfg: ModelConfig) -> tuple[str, dict[str, Any]]:
    """(timm architecture, extra `timm.create_model` arguments) reproducing `cfg`'s image tower."""
    vision = resolve_architecture(cfg)["vision_cfg"]
    if "timm_model_name" in vision:
        return vision["timm_model_name"].split(".")[0], {}
    different = {k: vision[k] for k, default in UNSUPPORTED_VIT.items() if vision.get(k, default) != default}
    if different:
        raise ConfigError(f"model '{cfg.name}' image tower uses {different}, which timm's CLIP ViT "
                          f"does not reproduce; export it with the open_clip format instead")
    width, layers, patch, size = vision["width"], vision["layers"], vision["patch_size"], vision["image_size"]
    quick = "quickgelu_" if resolve_architecture(cfg).get("quick_gelu") else ""
    name = f"vit_{TIMM_CLIP_SIZES.get((width, layers), 'base')}_patch{patch}_clip_{quick}{size}"
    if not timm.is_model(name):
        name = f"vit_base_patch16_clip_{quick}224"  # the template; model_args give the shapes
    args = {"img_size": size, "patch_size": patch, "embed_dim": width, "depth": layers,
            "num_heads": width // vision.get("head_width", 64), "mlp_ratio": vision.get("mlp_ratio", 4.0)}
    return name, args


def export_timm(path: str | Path, out_dir: str | Path) -> Path:
    """Write a checkpoint's image tower as a timm model directory; returns the directory.

    The classifier head holds the CLIP projection (num_classes = embed_dim, no bias), so
    `num_classes=0` gives the pooled embedding and the saved head gives the CLIP image embedding.
    """
    bundle, info = checkpoint_bundle(path)
    cfg, visual = bundle.config, bundle.model.visual
    arch, model_args = timm_image_tower(cfg)
    embed_dim = resolve_architecture(cfg)["embed_dim"]
    tower = timm.create_model(arch, num_classes=embed_dim, **model_args)
    tower.pretrained_cfg = {k: v for k, v in tower.pretrained_cfg.items() if k not in TIMM_SOURCE_KEYS}
    if hasattr(visual, "trunk"):  # a timm tower: its trunk is already a timm model, the projection beside it
        state = dict(visual.trunk.state_dict(), **{"head.weight": visual.head.proj.weight,
                                                   "head.bias": torch.zeros(embed_dim)})
    else:
        state = timm_vit.checkpoint_filter_fn({f"visual.{k}": v for k, v in visual.state_dict().items()}, tower)
    tower.load_state_dict(state)
    data = image_preprocess_config(cfg)
    out_dir = Path(out_dir)
    save_for_hf(tower, out_dir, model_args=model_args, safe_serialization=True,
                data_config={k: data[k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")})
    _readable(out_dir / "model.safetensors")
    _write_provenance(info, out_dir)
    return out_dir
