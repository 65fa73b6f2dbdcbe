"""Every shipped recipe validates at the GPU counts it states and resolves to the numbers it cites."""
import math
from pathlib import Path

import pytest

from clipscale.config import SWEEP_POINT, load_config, load_sweep
from clipscale.plan import GIB, memory_per_gpu, stated_gpus, validate_launch

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
ALL = sorted(RECIPES.glob("*.toml"))


def configs(recipe: Path):
    """The recipe's config, or one per run of a sweep recipe."""
    if "[sweep]" in recipe.read_text():
        return [load_config(recipe, overrides) for _, overrides in load_sweep(recipe)]
    return [load_config(recipe)]


@pytest.mark.parametrize("recipe", ALL, ids=[p.stem for p in ALL])
def test_recipe_validates_at_each_stated_gpu_count(recipe):
    for gpus in stated_gpus(recipe):
        for cfg in configs(recipe):
            validate_launch(cfg, gpus)


# Numbers the published recipes state in their comments: GPUs x per-GPU batch = global batch,
# samples seen, warmup in steps, learning rate, weight decay, checkpoints.
PUBLISHED = {
    "vit_g14_laion2b": dict(model="ViT-g-14", gpus=1480, per_gpu=60, total=256 * 135_000_000,
                            warmup_steps=13_500, lr=1e-3, wd=0.2, checkpoints=256),
    "vit_g14_laion2b_160gpu": dict(model="ViT-g-14", gpus=160, per_gpu=555, total=256 * 135_000_000,
                                   warmup_steps=13_500, lr=1e-3, wd=0.2, checkpoints=256, chunks=5),
    "vit_b32_laion400m": dict(model="ViT-B-32", gpus=128, per_gpu=256, total=13_000_000_000,
                              warmup_steps=2_000, lr=5e-4, wd=0.2),
    "vit_b16_laion400m": dict(model="ViT-B-16", gpus=176, per_gpu=192, total=13_000_000_000,
                              warmup_steps=2_000, lr=5e-4, wd=0.2),
    "vit_l14_laion400m": dict(model="ViT-L-14", gpus=400, per_gpu=96, total=13_000_000_000,
                              warmup_steps=2_000, lr=5e-4, wd=0.2),
    "scaling_laion": dict(model="ViT-B-32", gpus=1024, per_gpu=84, total=3_000_000_000,
                          warmup_steps=10_000, lr=1e-3, wd=0.2),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_recipe_resolves_to_its_stated_numbers(name):
    want, recipe = PUBLISHED[name], RECIPES / f"{name}.toml"
    text = recipe.read_text()
    assert "Source" in text or "et al." in text, f"{recipe} cites no source"
    assert want["gpus"] in stated_gpus(recipe)
    cfg = load_config(recipe, [SWEEP_POINT])  # a grid recipe's base run
    t = cfg.train
    assert cfg.model.name == want["model"]
    assert t.global_batch_size == want["gpus"] * want["per_gpu"]
    assert f"{t.global_batch_size:,}" in text  # the comment states the batch it resolves to
    assert t.total_samples == want["total"]
    assert cfg.optim.warmup_samples == want["warmup_steps"] * t.global_batch_size
    assert (cfg.optim.lr_peak, cfg.optim.weight_decay, cfg.optim.schedule) == (want["lr"], want["wd"], "cosine")
    if "checkpoints" in want:
        assert t.total_samples // t.checkpoint_every_samples == want["checkpoints"]
    if "chunks" in want:
        assert math.ceil(want["per_gpu"] / t.chunk_size) == want["chunks"] and cfg.loss.tiled


def test_scaling_grid_spans_models_samples_and_datasets():
    runs = load_sweep(RECIPES / "scaling_laion.toml")
    grid = {tuple(name.split("-")[1:]) for name, _ in runs}
    assert grid == {(m, s, d) for m in ("B32", "B16", "L14", "H14") for s in ("3B", "13B", "34B")
                    for d in ("80M", "400M", "2B")}


def test_vit_g14_on_160_gpus_fits_80_gib_through_the_gradient_cache():
    cfg = load_config(RECIPES / "vit_g14_laion2b_160gpu.toml")
    assert memory_per_gpu(cfg, world_size=160)["total"] < 80 * GIB
    assert memory_per_gpu(cfg, world_size=160, samples=555)["total"] > 80 * GIB  # not without it
