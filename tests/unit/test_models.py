import pytest

from clipscale.config import ConfigError, ModelConfig
from clipscale.models import build_model, count_params, gmacs_per_sample, resolve_architecture


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
    import torch

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
