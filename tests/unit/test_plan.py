"""`clipscale plan`: memory estimates against measured CPU peaks, and the budget of a published recipe."""
import json
from pathlib import Path

import pytest
import torch

from benchmarks.memory import peak_tensor_bytes
from clipscale.cli import main
from clipscale.compute import model_compute
from clipscale.config import load_config
from clipscale.loss import contrastive_loss
from clipscale.models import build_model
from clipscale.optim import build_optimizer
from clipscale.plan import largest_chunk, memory_per_gpu

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
# Small vocabularies keep the text embedding from dwarfing the activations being checked.
SMALL = ["model.name=plan-small", "model.architecture={embed_dim=32, vision_cfg={image_size=32, patch_size=4, "
         "width=64, layers=2, head_width=32}, text_cfg={context_length=16, vocab_size=1000, width=64, heads=2, "
         "layers=2}}"]
DEEPER = ["model.name=plan-deeper", "model.architecture={embed_dim=64, vision_cfg={image_size=64, patch_size=8, "
          "width=128, layers=4, head_width=32}, text_cfg={context_length=32, vocab_size=1000, width=128, "
          "heads=4, layers=4}}"]

TIMM = ["model.name=ViT-B-16", "model.timm_image_tower=vit_tiny_patch16_224", "model.text_width=64",
        "model.text_layers=1", "model.context_length=16", "model.embed_dim=32"]


def measured_bytes(cfg) -> float:
    """Weights and AdamW state (as allocated) plus the peak of live tensors during forward and backward."""
    torch.manual_seed(0)
    bundle = build_model(cfg.model)
    model = bundle.model.train()
    model.set_grad_checkpointing(cfg.train.grad_checkpointing)
    optimizer = build_optimizer(model, cfg.optim)
    batch, size = cfg.train.global_batch_size, bundle.image_size
    images, texts = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch, bundle.context_length))

    def step():
        out = model(images, texts)
        loss = contrastive_loss(cfg.loss, out["image_features"], out["text_features"], out["logit_scale"].exp(),
                                out.get("logit_bias"))
        loss.backward()

    step()
    optimizer.step()  # allocates the moments
    optimizer.zero_grad(set_to_none=True)
    states = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
    static = sum(p.numel() * 4 for p in model.parameters()) + sum(t.numel() * t.element_size() for t in states)
    return static + peak_tensor_bytes(step)


@pytest.mark.parametrize("overrides", [
    SMALL + ["train.global_batch_size=32"],
    SMALL + ["train.global_batch_size=64", "train.grad_checkpointing=true"],
    SMALL + ["train.global_batch_size=128", "loss.kind='siglip'", "model.init_logit_bias=-10.0"],
    SMALL + ["train.global_batch_size=256", "loss.tiled=true", "loss.tile_size=64"],
    DEEPER + ["train.global_batch_size=16"],
    DEEPER + ["train.global_batch_size=32", "train.grad_checkpointing=true"],
    TIMM + ["train.global_batch_size=8"],
    TIMM + ["train.global_batch_size=8", "train.grad_checkpointing=true"],
], ids=["small", "checkpointed", "siglip", "tiled", "deeper", "deeper-checkpointed", "timm", "timm-checkpointed"])
def test_memory_estimate_is_within_a_quarter_of_the_measured_peak(overrides):
    cfg = load_config(None, overrides + ["train.total_samples=100000"])
    estimate = memory_per_gpu(cfg, world_size=1)
    assert estimate["total"] == pytest.approx(measured_bytes(cfg), rel=0.25)


def test_fsdp_shards_weights_gradients_and_optimizer_state():
    cfg = load_config(None, SMALL + ["train.global_batch_size=64"])
    ddp = memory_per_gpu(cfg, world_size=8, parallel="ddp")
    fsdp = memory_per_gpu(cfg, world_size=8, parallel="fsdp")
    params = model_compute(cfg.model).params.total
    assert ddp["weights"] == 4 * params and fsdp["weights"] == 4 * params / 8
    assert ddp["optimizer"] == 8 * fsdp["optimizer"] == 8 * params
    assert fsdp["activations"] == ddp["activations"]
    checkpointed = memory_per_gpu(cfg, world_size=8, checkpointing=True)
    assert checkpointed["activations"] < ddp["activations"]


def test_largest_gradcache_chunk_is_the_last_that_fits():
    cfg = load_config(None, SMALL + ["train.global_batch_size=512", "train.chunk_size=8"])
    budget = memory_per_gpu(cfg, world_size=1, samples=100)["total"]
    chunk = largest_chunk(cfg, world_size=1, gpu_mem_bytes=budget)
    assert chunk == 100
    too_small = memory_per_gpu(cfg, world_size=1, samples=1)["total"] - 1
    assert largest_chunk(cfg, world_size=1, gpu_mem_bytes=too_small) == 0


def test_plan_prints_the_vit_g14_budget_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", str(RECIPES / "vit_g14_laion2b.toml"), "--gpus", "1480", "--gpu-mem", "40",
                 "--peak-tflops", "312", "--mfu", "0.4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ViT-g-14 on 1480 GPUs" in printed and "GPU-hours" in printed
    plan = json.loads(out.read_text())
    for key in ("params", "gmacs_per_sample", "gmacs_per_sample_no_attn"):
        assert set(plan[key]) == {"image", "text", "total"}
    assert plan["launch_check"] == "ok" and plan["per_gpu_batch"] == 60
    assert plan["steps"] == 34_560_000_000 // 88_800
    flops = plan["model_flops_per_sample"] * 88_800 * plan["steps"]
    assert plan["gpu_hours"] == pytest.approx(flops / (312e12 * 0.4) / 3600)
    assert plan["memory_gib"]["fsdp_checkpointed"]["total"] < plan["memory_gib"]["ddp"]["total"]
    assert plan["fits"] == (plan["memory_as_configured_gib"] <= 40)


def test_plan_takes_overrides_without_a_recipe(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(["plan", "model.name=ViT-L-14", "run.accelerator=H100", "--gpus", "8", "--gpu-mem", "80",
                 "--out", str(out)]) == 0
    plan = json.loads(out.read_text())
    assert plan["model"] == "ViT-L-14" and plan["memory_gib"]["ddp"]["total"] > 0
    assert plan["launch_check"] == "ok"  # data.num_streams unset: 8 streams, one per GPU and shard
    assert main(["plan", "model.name=ViT-L-14", "--gpus", "3", "--gpu-mem", "80", "--peak-tflops", "989",
                 "--out", str(out)]) == 2
    assert "not divisible by the world size 3" in capsys.readouterr().err


def test_plan_takes_the_peak_from_the_named_recipes_accelerator_and_writes_only_with_out(tmp_path, capsys,
                                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "vit_g14_laion2b", "--gpus", "1480", "--gpu-mem", "40"]) == 0
    assert "312 TFLOP/s peak (run.accelerator=A100)" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # no --out: nothing written
    assert main(["plan", "vit_g14_laion2b", "--gpus", "1480", "--gpu-mem", "40", "--peak-tflops", "989",
                 "--out", "p.json"]) == 0
    assert "989 TFLOP/s peak (--peak-tflops)" in capsys.readouterr().out
    assert json.loads((tmp_path / "p.json").read_text())["peak_tflops_from"] == "--peak-tflops"


@pytest.mark.parametrize("overrides, message", [
    ([], "set run.accelerator (one of ['A100', 'B200', 'H100', 'H200']) or pass --peak-tflops"),
    (["run.accelerator=TPU"], "run.accelerator='TPU' has no known peak"),
])
def test_plan_without_a_known_peak_says_what_to_set(overrides, message, capsys):
    assert main(["plan", "model.name=ViT-L-14", *overrides, "--gpus", "8", "--gpu-mem", "80"]) == 2
    assert message in capsys.readouterr().err
