"""The held-out contrastive loss of a caption set equals clipscale.loss on the same features and batches,
in `clipscale eval` and in training's evaluations."""
import pytest
import torch
import torch.nn.functional as F

from clipscale.config import Config, ConfigError, EvalConfig, ModelConfig, RunConfig
from clipscale.data.config import DataConfig
from clipscale.evaluate.datasets import EvalDataError, open_eval_set
from clipscale.evaluate.features import encode_split
from clipscale.evaluate.heldout_loss import heldout_loss
from clipscale.evaluate.runner import evaluate_model, evaluate_weights, maybe_eval, parse_tasks
from clipscale.loss import LossConfig, contrastive_loss
from clipscale.models import ModelBundle, build_model
from clipscale.results import ModelInfo, read_rows
from tests.eval_kit import CLASSNAMES, tiny_open_clip, write_retrieval_set


def features(n_images=11, seed=0):
    """Unit-norm image features (N, D) and 1-3 captions per image (T, D) with their images (T,)."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 4, (n_images,), generator=g)
    owner = torch.repeat_interleave(torch.arange(n_images), counts)  # (T,)
    images = F.normalize(torch.randn(n_images, 8, generator=g, dtype=torch.float64), dim=-1)
    texts = F.normalize(images[owner] + 0.7 * torch.randn(len(owner), 8, generator=g, dtype=torch.float64), dim=-1)
    return images, texts, owner


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_equals_clipscale_loss_on_each_full_batch_of_first_captions(kind):
    images, texts, owner = features()
    scale, bias = torch.tensor(12.0, dtype=torch.float64), torch.tensor(-4.0, dtype=torch.float64)
    bias = bias if kind == "siglip" else None
    got = heldout_loss(images, texts, owner, logit_scale=scale, logit_bias=bias, kind=kind, batch_size=4,
                       device=torch.device("cpu"), name="s")
    first = [int((owner == i).nonzero()[0]) for i in range(len(images))]  # each image's first caption
    expected = [contrastive_loss(LossConfig(kind=kind), images[b:b + 4], texts[first[b:b + 4]], scale, bias)
                for b in (0, 4)]  # images 8-10 make no full batch
    assert got == {f"{kind}_loss": pytest.approx(float(sum(expected) / 2), rel=1e-12)}


def test_batch_size_errors_name_the_field():
    images, texts, owner = features(n_images=3)
    with pytest.raises(EvalDataError, match="s has 3 images, fewer than eval.loss_batch_size=4"):
        heldout_loss(images, texts, owner, logit_scale=torch.tensor(1.0), logit_bias=None, kind="clip", batch_size=4,
                     device=torch.device("cpu"), name="s")
    with pytest.raises(ConfigError, match="eval.loss_batch_size=1 must be at least 2"):
        EvalConfig(loss_batch_size=1)


def test_a_caption_set_yields_the_loss_of_the_models_kind_and_rows_name_its_batch(tmp_path):
    captions = [(k % 8, [f"a {CLASSNAMES[k % 8]}", "something else"][: 1 + k % 2]) for k in range(10)]
    root = write_retrieval_set(tmp_path / "ret", [captions[:6], captions[6:]])
    model, preprocess, tokenizer = tiny_open_clip(seed=0)
    evalset = open_eval_set("ret", str(root))
    cfg = EvalConfig(tasks=parse_tasks(["retrieval", "loss"]), batch_size=4, num_workers=0, loss_batch_size=5)
    results = {task: m for task, _, m in evaluate_model(model, tokenizer=tokenizer, preprocess=preprocess,
                                                        sets=[evalset], cfg=cfg, device=torch.device("cpu"))}
    assert set(results) == {"zeroshot_retrieval", "contrastive_loss"}
    test = encode_split(model, evalset, "test", preprocess=preprocess, tokenizer=tokenizer,
                        device=torch.device("cpu"), batch_size=4, num_workers=0)
    assert results["contrastive_loss"] == heldout_loss(
        test.image_features, test.text_features, test.text_image_index, logit_scale=model.logit_scale.exp(),
        logit_bias=None, kind="clip", batch_size=5, device=torch.device("cpu"), name="ret")

    bundle = ModelBundle(model=model, tokenizer=tokenizer, preprocess_val=preprocess, image_size=32, mean=(0, 0, 0),
                         std=(1, 1, 1), context_length=24, config=ModelConfig())
    info = ModelInfo(run="r", model="m", checkpoint=None, step=None, samples_seen=None, params=1,
                     gmacs_per_sample=1.0, dataset="d")
    hashes = []
    for batch in (5, 4):  # the loss depends on the batch size: another batch size is another evaluation
        rows = evaluate_weights(bundle, info, sets=[evalset], device=torch.device("cpu"),
                                cfg=EvalConfig(tasks=("contrastive_loss",), num_workers=0, loss_batch_size=batch),
                                results=tmp_path / "results.jsonl")
        assert [(r["task"], r["metric"]) for r in rows] == [("contrastive_loss", "clip_loss")]
        hashes.append(rows[0]["eval_hash"])
    assert hashes[0] != hashes[1] != evalset.eval_hash


def test_weights_outside_a_run_with_a_logit_bias_get_the_siglip_loss(tmp_path):
    captions = [(k % 8, [f"a {CLASSNAMES[k % 8]}"]) for k in range(4)]
    evalset = open_eval_set("ret", str(write_retrieval_set(tmp_path / "ret", [captions])))
    model, preprocess, tokenizer = tiny_open_clip(seed=0)
    model.logit_bias = torch.nn.Parameter(torch.tensor(-10.0, dtype=torch.float64))
    cfg = EvalConfig(tasks=("contrastive_loss",), batch_size=4, num_workers=0, loss_batch_size=4)
    [(task, _, metrics)] = evaluate_model(model, tokenizer=tokenizer, preprocess=preprocess, sets=[evalset], cfg=cfg,
                                          device=torch.device("cpu"))
    assert task == "contrastive_loss" and list(metrics) == ["siglip_loss"]


def test_training_writes_the_heldout_loss_of_its_kind_every_eval(tmp_path):
    ret = write_retrieval_set(tmp_path / "ret", [[(k % 8, [f"a {CLASSNAMES[k % 8]}"]) for k in range(8)]])
    cfg = Config(run=RunConfig(name="t", output_dir=str(tmp_path / "runs")), loss=LossConfig(kind="siglip"),
                 model=ModelConfig(init_logit_bias=-10.0), data=DataConfig(name="laion-mini"),
                 eval=EvalConfig(datasets=(f"ret={ret}",), every_samples=64, num_workers=0, batch_size=8,
                                 loss_batch_size=4))
    bundle = build_model(cfg.model, device=torch.device("cpu"))
    maybe_eval(cfg, model=bundle.model, bundle=bundle, step=2, samples_seen=64, batch_size=32, checkpoint_due=True)
    [loss] = [r for r in read_rows(cfg.run_dir) if r["task"] == "contrastive_loss"]
    assert (loss["metric"], loss["checkpoint"], loss["dataset"]) == ("siglip_loss", "step_000002", "laion-mini")
    assert loss["value"] > 0
