"""Trainer options of the real CLI: fp16 + loss scaling, activation checkpointing, torch.compile, MFU."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from clipscale import checkpoint as ckpt
from clipscale.compute import gmacs_per_sample
from clipscale.config import ConfigError, load_config, validate_for_world
from clipscale.metrics import mfu, peak_flops
from clipscale.models import build_model
from tests.helpers import run_cli


def common(data: dict, out: Path, name: str, *extra: str, samples: int = 96) -> list[str]:
    return [
        "train", f'data.train_shards="{data["train"]}"', f'eval.datasets=["synthetic={data["zeroshot"]}"]',
        f'run.output_dir="{out}"', f"run.name={name}", "log.progress_bar=false", "data.workers=1",
        "train.global_batch_size=32", f"train.total_samples={samples}", "train.log_every_steps=1",
        "train.checkpoint_every_samples=64", "optim.warmup_samples=64", *extra,
    ]


def rows(run_dir: Path) -> dict[int, dict]:
    """Metrics row of each step; a step re-run after a resume overwrites its earlier line."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in lines if "loss" in r}


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for _, r in sorted(rows(run_dir).items())]


@pytest.fixture(scope="module")
def eager_baseline(synthetic_data, tmp_path_factory) -> list[float]:
    """Three fp32 steps in one process, no checkpointing, no compile: the reference trajectory."""
    out = tmp_path_factory.mktemp("baseline")
    run_cli(*common(synthetic_data, out, "eager"))
    return losses(out / "eager")


@pytest.mark.slow
def test_fp16_trains_logs_the_scale_and_resumes_exactly(synthetic_data, tmp_path):
    run_cli(*common(synthetic_data, tmp_path, "fp16", "train.precision=fp16", samples=192))
    run = tmp_path / "fp16"
    full = rows(run)
    assert sorted(full) == [1, 2, 3, 4, 5, 6]
    values = [full[s]["loss"] for s in sorted(full)]
    assert all(torch.isfinite(torch.tensor(values)))
    assert min(values[3:]) < values[0]  # it is training
    assert all(r["loss_scale"] > 0 for r in full.values())

    # A run stopped right after its step-2 checkpoint: later checkpoints never happened.
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    for later in ("step_000004", "step_000006"):
        shutil.rmtree(resumed / "checkpoints" / later)
    saved = {}
    ckpt.load_states(run / "checkpoints" / "step_000002", {"grad_scaler": ckpt.PlainState(dict, saved.update)})
    assert saved["scale"] == full[2]["loss_scale"]
    run_cli(*common(synthetic_data, tmp_path, "resumed", "train.precision=fp16", samples=192))
    again = rows(resumed)
    assert [again[s]["loss"] for s in range(3, 7)] == [full[s]["loss"] for s in range(3, 7)]
    assert [again[s]["loss_scale"] for s in range(3, 7)] == [full[s]["loss_scale"] for s in range(3, 7)]


@pytest.mark.slow
def test_fp16_with_gradient_cache_follows_plain_fp16(synthetic_data, tmp_path):
    run_cli(*common(synthetic_data, tmp_path, "plain16", "train.precision=fp16"))
    run_cli(*common(synthetic_data, tmp_path, "gc16", "train.precision=fp16", "train.chunk_size=8"))
    plain, cached = rows(tmp_path / "plain16"), rows(tmp_path / "gc16")
    assert sorted(cached) == [1, 2, 3]
    assert [r["loss_scale"] for r in cached.values()] == [r["loss_scale"] for r in plain.values()]
    assert [r["loss"] for r in cached.values()] == pytest.approx([r["loss"] for r in plain.values()], rel=1e-2)


def test_fp16_with_fsdp_is_refused():
    with pytest.raises(ConfigError, match="sharded grad scaler; use train.precision='bf16'"):
        load_config(None, ["train.precision=fp16", "train.parallel=fsdp"])  # refused when the config is built
    validate_for_world(load_config(None, ["train.precision=fp16"]), 2)  # DDP fp16 is fine


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_activation_checkpointing_keeps_the_trajectory(eager_baseline, synthetic_data, tmp_path, parallel):
    run_cli(*common(synthetic_data, tmp_path, parallel, "train.grad_checkpointing=true",
                    f"train.parallel={parallel}"), nproc=2)
    assert losses(tmp_path / parallel) == pytest.approx(eager_baseline, rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_compiled_run_follows_the_eager_trajectory(eager_baseline, synthetic_data, tmp_path):
    run_cli(*common(synthetic_data, tmp_path, "compiled", "train.compile=true",
                    'train.compile_backend="aot_eager"'))
    assert losses(tmp_path / "compiled") == pytest.approx(eager_baseline, rel=1e-4, abs=1e-5)


def test_peak_flops_lookup_and_mfu():
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
    assert peak_flops("cpu") is None
    assert mfu(flops_per_sample=1e9, samples_per_s_per_device=100.0, peak=None) is None
    assert mfu(flops_per_sample=3e12, samples_per_s_per_device=50.0, peak=300e12) == pytest.approx(0.5)


def transformer_macs(*, tokens: int, width: int, layers: int) -> int:
    """Hand count of a pre-norm transformer's matmul MACs: qkv, out proj, 4x MLP, scores, values."""
    per_layer = tokens * width * 3 * width + tokens * width * width + 2 * tokens * width * 4 * width
    return layers * (per_layer + 2 * tokens * tokens * width)


def hand_count(bundle) -> int:
    model, visual = bundle.model, bundle.model.visual
    patch = visual.conv1.kernel_size[0]
    patches = (bundle.image_size // patch) ** 2
    vw, tw = visual.conv1.out_channels, model.token_embedding.embedding_dim
    return (
        patches * 3 * patch * patch * vw  # patch embedding
        + transformer_macs(tokens=patches + 1, width=vw, layers=len(visual.transformer.resblocks))
        + vw * visual.proj.shape[1]  # pooled token -> embedding
        + transformer_macs(tokens=bundle.context_length, width=tw, layers=len(model.transformer.resblocks))
        + tw * model.text_projection.shape[1]
    )


@pytest.fixture(scope="module")
def tiny_bundle():
    torch.manual_seed(0)
    return build_model(load_config(None, ["model.vision_width=32", "model.text_width=32", "model.embed_dim=16"]).model)


def test_gmacs_per_sample_counts_attention(tiny_bundle):
    assert gmacs_per_sample(tiny_bundle) * 1e9 == pytest.approx(hand_count(tiny_bundle), rel=1e-9)
