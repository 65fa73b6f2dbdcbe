"""Exports load in open_clip and timm and compute what clipscale's model computes; `clipscale.load`."""
import json
import os
import stat

import open_clip
import pytest
import timm
import torch
from PIL import Image

import clipscale

from clipscale import checkpoint as ckpt
from clipscale.config import Config, ConfigError, ModelConfig, config_to_dict
from clipscale.evaluate.runner import evaluate_target
from clipscale.export import PROVENANCE, export_open_clip, export_timm, timm_image_tower
from clipscale.models import build_model, resolve_architecture
from clipscale.train import Progress

TOL = dict(atol=1e-5, rtol=1e-5)


def saved_checkpoint(tmp_path, mcfg: ModelConfig):
    """A checkpoint of a randomly initialised model with its config, and that model (eval mode)."""
    torch.manual_seed(0)
    cfg = Config(model=mcfg)
    model = build_model(mcfg).model
    with torch.no_grad():  # move every parameter off its initial value (zero biases, unit gains)
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    saver = ckpt.Checkpointer(tmp_path / "run" / "checkpoints", states={"model": ckpt.ModelState(model)},
                              policy=ckpt.RetentionPolicy(), meta={"config": config_to_dict(cfg)})
    saver.save(Progress(step=3, samples_seen=3))
    return tmp_path / "run" / "checkpoints" / "step_000003", model.eval()


TINY = ModelConfig(vision_width=64, vision_layers=2, text_width=32, embed_dim=16)


def test_open_clip_directory_loads_by_dir_and_by_file(tmp_path):
    path, model = saved_checkpoint(tmp_path, TINY)
    out = export_open_clip(path, tmp_path / "export")
    assert {p.name for p in out.iterdir()} == {"open_clip_config.json", "open_clip_model.safetensors",
                                               "open_clip_pytorch_model.bin", "README.md", PROVENANCE}
    arch = resolve_architecture(TINY)
    by_file = open_clip.create_model(TINY.name, pretrained=str(out / "open_clip_pytorch_model.bin"),
                                     embed_dim=arch.pop("embed_dim"), **arch)
    by_dir = open_clip.create_model(f"local-dir:{out}")
    image, text = torch.randn(2, 3, 32, 32), torch.randint(0, 1000, (2, 32))
    for loaded in (by_file, by_dir):
        loaded.eval()
        torch.testing.assert_close(loaded.encode_image(image), model.encode_image(image), **TOL)
        torch.testing.assert_close(loaded.encode_text(text), model.encode_text(text), **TOL)
    assert by_dir.visual.preprocess_cfg["mean"] == list(model.visual.preprocess_cfg["mean"])


def test_open_clip_vit_tower_exports_to_timm_clip_vit(tmp_path):
    path, model = saved_checkpoint(tmp_path, TINY)
    out = export_timm(path, tmp_path / "timm")
    arch, args = timm_image_tower(TINY)
    assert arch == "vit_base_patch16_clip_224" and args["embed_dim"] == 64 and args["depth"] == 2
    image = torch.randn(2, 3, 32, 32)
    visual = model.visual
    visual.output_tokens = True
    embedding, tokens = visual(image)  # (B, 16) projected class token, (B, 64 patches, 64)
    visual.output_tokens = False

    by_file = timm.create_model(arch, pretrained=True, num_classes=0, **args,
                                pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"))).eval()
    features = by_file.forward_features(image)  # (B, 1 + 64, 64)
    torch.testing.assert_close(features[:, 1:], tokens, **TOL)
    torch.testing.assert_close(by_file(image), features[:, 0], **TOL)
    torch.testing.assert_close(by_file(image) @ visual.proj, embedding, **TOL)
    torch.testing.assert_close(by_file.forward_head(features, pre_logits=True), features[:, 0], **TOL)

    by_dir = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # the saved head is the CLIP projection
    torch.testing.assert_close(by_dir(image), model.encode_image(image), **TOL)
    assert tuple(by_dir.pretrained_cfg["mean"]) == tuple(model.visual.preprocess_cfg["mean"])

    blocks = timm.create_model(f"local-dir:{out}", pretrained=True, features_only=True, out_indices=(-1,)).eval()
    last_block = {}
    visual.transformer.resblocks[-1].register_forward_hook(lambda m, i, o: last_block.update(x=o))
    visual(image)
    grid = last_block["x"][:, 1:].transpose(1, 2).reshape(2, 64, 8, 8)  # (B, C, H, W) as timm's feature maps
    torch.testing.assert_close(blocks(image)[-1], grid, **TOL)


def test_timm_tower_exports_as_itself(tmp_path):
    mcfg = ModelConfig(name="ViT-B-16", timm_image_tower="vit_medium_patch16_reg4_gap_256", text_width=32,
                       text_layers=1, embed_dim=16)
    path, model = saved_checkpoint(tmp_path, mcfg)
    out = export_timm(path, tmp_path / "timm")
    image = torch.randn(1, 3, 256, 256)
    pooled = timm.create_model("vit_medium_patch16_reg4_gap_256", pretrained=True, num_classes=0,
                               pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"))).eval()
    torch.testing.assert_close(pooled(image), model.visual.trunk(image), **TOL)
    embedding = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    torch.testing.assert_close(embedding(image), model.encode_image(image), **TOL)


def test_towers_timm_cannot_reproduce_are_refused():
    with pytest.raises(ConfigError, match="attentional_pool.*export it with the open_clip format"):
        timm_image_tower(ModelConfig(architecture={"vision_cfg": {"attentional_pool": True}}))


def test_export_command_writes_both_formats(tmp_path, capsys):
    from clipscale.cli import main

    path, model = saved_checkpoint(tmp_path, TINY)
    assert main(["export", str(path), "--out", str(tmp_path / "oc")]) == 0
    assert main(["export", str(path), "--out", str(tmp_path / "tm"), "--format", "timm"]) == 0
    assert "local-dir:" in capsys.readouterr().out
    image = torch.randn(1, 3, 32, 32)
    loaded = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}").eval()
    torch.testing.assert_close(loaded.encode_image(image), model.encode_image(image), **TOL)
    tower = timm.create_model(f"local-dir:{tmp_path / 'tm'}", pretrained=True).eval()
    torch.testing.assert_close(tower(image), model.encode_image(image), **TOL)


def test_exported_files_take_the_umask_mode(tmp_path):
    path, _ = saved_checkpoint(tmp_path, TINY)
    old = os.umask(0o022)
    try:
        files = [*export_open_clip(path, tmp_path / "oc").iterdir(), *export_timm(path, tmp_path / "tm").iterdir()]
    finally:
        os.umask(old)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o644 for p in files}


def test_timm_config_names_no_other_models_weights(tmp_path):
    path, _ = saved_checkpoint(tmp_path, TINY)
    config = json.loads((export_timm(path, tmp_path / "tm") / "config.json").read_text())
    assert config["architecture"] == "vit_base_patch16_clip_224"
    assert not {"tag", "license", "hf_hub_id"} & set(config["pretrained_cfg"])


def test_load_gives_the_same_model_from_a_run_a_checkpoint_and_an_export(tmp_path):
    path, model = saved_checkpoint(tmp_path, TINY)
    export_open_clip(path, tmp_path / "export")
    image = Image.new("RGB", (40, 30), (200, 30, 90))
    outputs = []
    for target in (tmp_path / "run", path, tmp_path / "export"):
        loaded, preprocess, tokenizer = clipscale.load(target)
        pixels, tokens = preprocess(image).unsqueeze(0), tokenizer(["a red square", "a blue circle"])
        with torch.no_grad():
            outputs.append((pixels, tokens, loaded.encode_image(pixels), loaded.encode_text(tokens)))
        assert not loaded.training
    for got in outputs[1:]:
        for a, b in zip(got, outputs[0]):
            torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(outputs[0][2], model.encode_image(outputs[0][0]), **TOL)


def test_load_names_what_it_cannot_read(tmp_path):
    with pytest.raises(ConfigError, match="neither a run directory"):
        clipscale.load(tmp_path)


def test_an_evaluated_export_keeps_its_runs_provenance(tmp_path):
    from tests.eval_kit import write_classification_set

    path, _ = saved_checkpoint(tmp_path, TINY)
    out = export_open_clip(path, tmp_path / "export")
    evalset = write_classification_set(tmp_path / "set", [[(k, k) for k in range(8)]])
    registered = set(open_clip.list_models())
    rows = evaluate_target(str(out), overrides={"datasets": (f"swatches={evalset}",), "tasks": ("zeroshot",)},
                           device="cpu", out=str(tmp_path / "rows.jsonl"))
    assert set(open_clip.list_models()) == registered  # nothing registered in open_clip's global registry
    assert rows and {(r["run"], r["model"], r["checkpoint"], r["step"], r["samples_seen"], r["dataset"])
                     for r in rows} == {("tiny_cpu", TINY.name, "step_000003", 3, 3, Config().data.dataset_name)}
    assert all(r["compute_gmacs"] == pytest.approx(r["gmacs_per_sample"] * 3) for r in rows)
