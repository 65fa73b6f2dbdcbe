import math

import pytest
import torch

from clipscale.config import OptimConfig
from clipscale.optim import build_optimizer, lr_at, no_weight_decay


def reference_lr(s, *, peak, warm, total, min_ratio):
    if s < warm:
        return peak * s / warm
    p = (s - warm) / (total - warm)
    lo = peak * min_ratio
    return lo + (peak - lo) * (1 + math.cos(math.pi * p)) / 2


@pytest.mark.parametrize("min_ratio", [0.0, 0.1])
def test_warmup_cosine_matches_reference(min_ratio):
    cfg = OptimConfig(lr_peak=3e-3, warmup_samples=1000, lr_min_ratio=min_ratio)
    for s in [0, 1, 500, 999, 1000, 1500, 4000, 9999, 10000]:
        assert lr_at(s, cfg=cfg, total_samples=10_000) == pytest.approx(
            reference_lr(s, peak=3e-3, warm=1000, total=10_000, min_ratio=min_ratio), rel=1e-12, abs=1e-15)


def test_schedule_depends_on_samples_not_batch_size():
    cfg = OptimConfig(warmup_samples=256)
    # Two global batch sizes visiting the same sample counts see the same learning rates.
    small = [lr_at(s, cfg=cfg, total_samples=4096) for s in range(128, 4097, 128)]
    large = [lr_at(s, cfg=cfg, total_samples=4096) for s in range(256, 4097, 256)]
    assert small[1::2] == large


def test_const_cooldown():
    cfg = OptimConfig(lr_peak=1.0, warmup_samples=10, schedule="const-cooldown", cooldown_samples=20)
    assert lr_at(5, cfg=cfg, total_samples=100) == 0.5
    assert lr_at(80, cfg=cfg, total_samples=100) == 1.0
    assert lr_at(90, cfg=cfg, total_samples=100) == pytest.approx(0.5)
    assert lr_at(100, cfg=cfg, total_samples=100) == pytest.approx(0.0)


def test_no_decay_groups():
    from clipscale.config import ModelConfig
    from clipscale.models import build_model

    model = build_model(ModelConfig()).model
    opt = build_optimizer(model, OptimConfig(weight_decay=0.2))
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert {"logit_scale", "token_embedding.weight", "positional_embedding"} <= no_decay_names
    assert all(not n.endswith(".bias") for n in (names[id(p)] for p in decay["params"]))
    assert "visual.transformer.resblocks.0.mlp.c_fc.weight" not in no_decay_names
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert no_weight_decay("x.ln_1.weight", torch.zeros(3))


def test_crossed_is_true_on_the_step_that_passes_a_multiple():
    from clipscale.optim import crossed

    assert [s for s in range(32, 257, 32) if crossed(s, 32, 100)] == [128, 224]
    assert crossed(200, 32, 200) and not crossed(199, 32, 200)
    assert not any(crossed(s, 32, 0) for s in range(32, 257, 32))  # 0: never


def test_one_autocast_for_training_and_evaluation():
    from clipscale.config import TrainConfig
    from clipscale.parallel import autocast, step_precision

    cpu = torch.device("cpu")
    with autocast(cpu, "bf16"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    with autocast(cpu, "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    assert step_precision(TrainConfig(precision="bf16")) == "bf16"
    assert step_precision(TrainConfig(precision="bf16", parallel="fsdp")) == "fp32"  # FSDP2's policy casts
