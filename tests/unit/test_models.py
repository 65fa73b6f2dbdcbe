import dataclasses

import open_clip
import pytest
import timm.data
import torch
from PIL import Image

from clipscale.compute import gmacs_per_sample
from clipscale.config import ConfigError, ModelConfig, load_config
from clipscale.models import build_model, count_params, create_model, image_preprocess_config, resolve_architecture


def test_overrides_reach_the_open_clip_model():
    cfg = ModelConfig(vision_width=96, vision_layers=3, text_width=128, text_layers=1, embed_dim=48,
                      image_size=40, patch_size=8, context_length=16)
    bundle = build_model(cfg)
    m = bundle.model
    assert len(m.visual.transformer.resblocks) == 3
    assert m.visual.conv1.out_channels == 96
    assert len(m.transformer.resblocks) == 1
    assert m.transformer.resblocks[0].attn.num_heads == 4  # 128 / 32
    assert m.text_projection.shape == (128, 48)
    assert bundle.image_size == 40 and bundle.context_length == 16
    assert bundle.tokenizer(["a red circle"]).shape == (1, 16)


def test_compute_grows_with_width():
    small = build_model(ModelConfig(vision_width=32, text_width=32))
    big = build_model(ModelConfig(vision_width=128, text_width=128))
    assert count_params(big.model) > count_params(small.model)
    # Transformer MACs grow roughly quadratically in width (linear parts dominate at this size).
    ratio = gmacs_per_sample(big) / gmacs_per_sample(small)
    assert 8 < ratio < 17


def test_bad_architecture_errors():
    with pytest.raises(ConfigError, match="model.name='nope' is not an open_clip architecture"):
        resolve_architecture(ModelConfig(name="nope"))
    with pytest.raises(ConfigError, match="not a multiple of model.patch_size"):
        resolve_architecture(ModelConfig(image_size=30, patch_size=4))


def test_lit_locks_the_image_tower_of_local_pretrained_weights(tmp_path):
    from clipscale.config import OptimConfig
    from clipscale.optim import build_optimizer

    small = ModelConfig(vision_width=32, text_width=32, embed_dim=16)
    source = build_model(small).model
    weights = tmp_path / "w.pt"
    torch.save({k: v.reshape(()) if k == "logit_scale" else v for k, v in source.state_dict().items()}, weights)
    bundle = build_model(ModelConfig(vision_width=32, text_width=32, embed_dim=16, pretrained=str(weights),
                                     lock_image=True))
    model = bundle.model
    assert torch.equal(model.visual.conv1.weight, source.visual.conv1.weight)  # loaded, not random
    assert not any(p.requires_grad for p in model.visual.parameters())
    assert all(p.requires_grad for p in model.transformer.parameters())
    opt = build_optimizer(model, OptimConfig())
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in model.visual.parameters())
    with pytest.raises(ConfigError, match="model.pretrained='nope.pt' is not a file"):
        build_model(ModelConfig(pretrained="nope.pt"))


# Published sizes in millions of parameters (open_clip's docs/model_profile.csv), built at full size
# on the meta device, which allocates nothing.
PUBLISHED_PARAMS_M = {"RN50": 102.01, "ViT-B-32": 151.28, "ViT-B-16": 149.62, "ViT-L-14": 427.62, "ViT-H-14": 986.11,
                      "ViT-g-14": 1366.68, "ViT-bigG-14": 2539.57, "ViT-B-16-SigLIP": 203.16}


@pytest.mark.parametrize("name", PUBLISHED_PARAMS_M)
def test_named_architectures_build_at_full_size(name):
    model = create_model(ModelConfig(name=name), device="meta")
    assert count_params(model) / 1e6 == pytest.approx(PUBLISHED_PARAMS_M[name], abs=0.01)


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-H-14", "ViT-g-14", "ViT-bigG-14"])
def test_named_architectures_run_on_cpu_at_reduced_size(name):
    arch = resolve_architecture(ModelConfig(name=name))
    head_width, patch = arch["vision_cfg"].get("head_width", 64), arch["vision_cfg"]["patch_size"]
    cfg = ModelConfig(name=name, vision_width=2 * head_width, vision_layers=1, image_size=2 * patch,
                      text_width=arch["text_cfg"]["heads"] * 8, text_layers=1, embed_dim=32)
    bundle = build_model(cfg)
    out = bundle.model(torch.zeros(1, 3, 2 * patch, 2 * patch), bundle.tokenizer(["a photo"]))
    assert out["image_features"].shape == out["text_features"].shape == (1, 32)


def test_timm_towers_bring_their_own_data_config():
    clip = image_preprocess_config(ModelConfig(name="ViT-B-16", timm_image_tower="vit_base_patch16_clip_384"))
    assert clip["input_size"] == (3, 384, 384) and clip["mean"] == open_clip.OPENAI_DATASET_MEAN
    assert clip["crop_mode"] == "squash"
    half = image_preprocess_config(ModelConfig(name="ViT-B-16", timm_image_tower="vit_base_patch16_384"))
    assert half["mean"] == half["std"] == (0.5, 0.5, 0.5)
    imagenet = image_preprocess_config(ModelConfig(name="ViT-B-16", timm_image_tower="deit_tiny_patch16_224"))
    assert imagenet["mean"] == timm.data.IMAGENET_DEFAULT_MEAN
    siglip = image_preprocess_config(ModelConfig(name="ViT-B-16-SigLIP"))  # open_clip's own timm tower
    assert siglip["mean"] == (0.5, 0.5, 0.5) and siglip["input_size"] == (3, 224, 224)

    cfg = ModelConfig(name="ViT-B-16", timm_image_tower="vit_medium_patch16_reg4_gap_256", text_width=64,
                      text_layers=1, embed_dim=32)
    bundle = build_model(cfg)
    data = timm.data.resolve_model_data_config(bundle.model.visual.trunk)
    assert (bundle.image_size, bundle.mean, bundle.std) == (256, data["mean"], data["std"])
    assert bundle.model.visual.trunk.num_reg_tokens == 4 and bundle.model.visual.trunk.global_pool == "avg"
    pixels = bundle.preprocess_val(Image.new("RGB", (300, 280)))
    assert pixels.shape == (3, 256, 256)
    assert bundle.model.encode_image(pixels[None]).shape == (1, 32)
    with pytest.raises(ConfigError, match=r"\['model.vision_width'\] reshape open_clip's ViT"):
        resolve_architecture(dataclasses.replace(cfg, vision_width=64))
    with pytest.raises(ConfigError, match="'vit_nope' is not a timm model"):
        resolve_architecture(ModelConfig(timm_image_tower="vit_nope"))


RECIPE_ARCHITECTURE = """
[model]
name = "my-vit"
[model.architecture]
embed_dim = 24
vision_cfg = { image_size = 16, patch_size = 8, width = 64, layers = 1, head_width = 32 }
text_cfg = { context_length = 12, vocab_size = 49408, width = 32, heads = 2, layers = 3 }
"""


def test_architectures_written_in_the_recipe(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE_ARCHITECTURE)
    bundle = build_model(load_config(recipe).model)
    assert bundle.model.visual.conv1.out_channels == 64 and len(bundle.model.transformer.resblocks) == 3
    assert bundle.tokenizer(["a cat"]).shape == (1, 12)
    # Over a known name the table changes only what it names.
    deeper = load_config(None, ["model.name=ViT-B-32", "model.architecture.vision_cfg.layers=2"]).model
    arch = resolve_architecture(deeper)
    assert arch["vision_cfg"]["layers"] == 2 and arch["vision_cfg"]["width"] == 768
    recipe.write_text('[model]\nname = "my-vit"\narchitecture = { embed_dim = 24 }\n')
    with pytest.raises(ConfigError, match=r"lacks \['vision_cfg', 'text_cfg'\]"):
        resolve_architecture(load_config(recipe).model)
    with pytest.raises(ConfigError, match="model.architecture: got 3, expected dict"):
        load_config(None, ["model.architecture=3"])
