"""Zero-shot evaluation: accuracy equals an independent computation; malformed sets fail clearly."""
import copy
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from clipscale.data import decode
from clipscale.data.synthetic import write_synthetic_dataset
from clipscale.evaluate import datasets
from clipscale.evaluate.datasets import ZeroShotDataError, read_zeroshot_metadata
from clipscale.evaluate.zeroshot import topk_correct, zeroshot_eval

# Eight well separated solid colours: class k is drawn in PALETTE[k].
PALETTE = np.array([[r, g, b] for r in (30, 225) for g in (30, 225) for b in (30, 225)], dtype=np.float64)
CLASSNAMES = [f"swatch {name}" for name in ("ash", "bay", "cob", "dun", "elm", "fir", "gum", "hue")]
TEMPLATES = ["a photo of a {c}.", "a {c}.", "one {c} here."]
# Offset of the stored label from the drawn class: 0 -> top-1 hit; 1..4 -> top-5 hit only.
OFFSETS = [0, 0, 3, 7, 0, 2, 5, 0, 1, 6, 0, 4, 0]


def tokenizer():
    return open_clip.get_tokenizer("ViT-B-32", context_length=16)


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)  # (3, H, W)


class FakeCLIP(torch.nn.Module):
    """Text: one-hot of the prompt's class. Image: scores decaying in (j - drawn class) mod C, so the
    top-5 classes of an image of class k are k, k+1, ..., k+4."""

    def __init__(self, prompt_class: dict[tuple[int, ...], int]):
        super().__init__()
        self.prompt_class = prompt_class
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.modes_seen: list[bool] = []

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        classes = torch.tensor([self.prompt_class[tuple(row.tolist())] for row in tokens])
        return torch.nn.functional.one_hot(classes, len(PALETTE)).float() * self.scale

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        self.modes_seen.append(self.training)
        mean_rgb = images.mean(dim=(2, 3)).double() * 255  # (B, 3)
        drawn = torch.cdist(mean_rgb, torch.from_numpy(PALETTE)).argmin(dim=1)  # (B,)
        rank = (torch.arange(len(PALETTE))[None] - drawn[:, None]) % len(PALETTE)  # (B, C)
        return (0.5 ** rank.float()) * self.scale


def write_zeroshot_shards(root: Path, labels_by_shard: list[list[tuple[int, int]]]) -> None:
    """Shards of solid-colour images; each sample is (drawn class, stored label)."""
    root.mkdir(parents=True, exist_ok=True)
    index = 0
    for shard, samples in enumerate(labels_by_shard):
        with tarfile.open(root / f"{shard:06d}.tar", "w") as tar:
            for drawn, label in samples:
                buf = io.BytesIO()
                Image.new("RGB", (24, 24), tuple(int(v) for v in PALETTE[drawn])).save(buf, format="JPEG")
                for ext, data in (("jpg", buf.getvalue()), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"{index:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                index += 1
    (root / "classnames.json").write_text(json.dumps(CLASSNAMES))
    (root / "templates.json").write_text(json.dumps(TEMPLATES))


@pytest.fixture
def swatches(tmp_path) -> tuple[Path, list[int]]:
    samples = [(i % len(PALETTE), (i % len(PALETTE) + off) % len(PALETTE)) for i, off in enumerate(OFFSETS)]
    write_zeroshot_shards(tmp_path / "zs", [samples[:7], samples[7:]])
    return tmp_path / "zs", OFFSETS


def fake_model() -> FakeCLIP:
    tok = tokenizer()
    prompts = {tuple(tok([t.format(c=name)])[0].tolist()): k
               for k, name in enumerate(CLASSNAMES) for t in TEMPLATES}
    return FakeCLIP(prompts)


def test_accuracy_of_a_designed_model_is_known(swatches):
    root, offsets = swatches
    model = fake_model().train()
    metrics = zeroshot_eval(model, tokenizer=tokenizer(), preprocess=to_tensor, zeroshot_dir=root,
                            device=torch.device("cpu"), batch_size=3)  # ragged batches across shards
    n = len(offsets)
    assert metrics == {"zeroshot_top1": sum(o == 0 for o in offsets) / n,
                       "zeroshot_top5": sum(o <= 4 for o in offsets) / n, "zeroshot_num_samples": n}
    assert model.modes_seen and not any(model.modes_seen), "images were encoded in train mode"
    assert model.training, "the model's train mode was not restored"


def test_topk_correct_matches_argsort_reference():
    rng = np.random.default_rng(0)
    for num_classes in (3, 5, 12):
        logits = rng.normal(size=(40, num_classes))
        labels = rng.integers(0, num_classes, 40)
        order = np.argsort(-logits, axis=1)
        expected = [int(sum(labels[i] in order[i, :k] for i in range(40))) for k in (1, 5)]
        got = topk_correct(torch.from_numpy(logits), torch.from_numpy(labels), ks=(1, 5))
        assert got == expected


def reference_counts(model: torch.nn.Module, *, zeroshot_dir: Path, preprocess) -> tuple[int, int, int]:
    """Top-1 / top-5 hits and n in float64, written out without open_clip's classifier builder."""
    classnames = json.loads((zeroshot_dir / "classnames.json").read_text())
    templates = json.loads((zeroshot_dir / "templates.json").read_text())
    tok = open_clip.get_tokenizer("ViT-B-32", context_length=model.context_length)
    with torch.no_grad():
        columns = []
        for name in classnames:
            text = model.encode_text(tok([t.format(c=name) for t in templates]))  # (T, D)
            mean = (text / text.norm(dim=1, keepdim=True)).mean(dim=0)
            columns.append(mean / mean.norm())
        classifier = torch.stack(columns, dim=1)  # (D, C)
        images, labels = [], []
        for shard in sorted(zeroshot_dir.glob("*.tar")):
            with tarfile.open(shard) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            for name in sorted(n for n in members if n.endswith(".jpg")):
                images.append(preprocess(Image.open(io.BytesIO(members[name])).convert("RGB")))
                labels.append(int(members[name.replace(".jpg", ".cls")]))
        features = model.encode_image(torch.stack(images).double())  # (N, D)
        logits = (features / features.norm(dim=1, keepdim=True)) @ classifier  # (N, C)
    order = logits.argsort(dim=1, descending=True).numpy()
    top1 = sum(order[i, 0] == y for i, y in enumerate(labels))
    top5 = sum(y in order[i, :5] for i, y in enumerate(labels))
    return top1, top5, len(labels)


@pytest.mark.slow
def test_open_clip_model_on_synthetic_set_matches_float64_reference(tmp_path):
    specs = write_synthetic_dataset(tmp_path, train_samples=10, samples_per_shard=40,
                                    zeroshot_samples=90, seed=5)
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(
        "ViT-B-32", pretrained=None, embed_dim=16,
        vision_cfg=dict(image_size=32, layers=1, width=32, head_width=16, patch_size=8),
        text_cfg=dict(context_length=24, vocab_size=49408, width=32, heads=2, layers=1))
    model = model.double()
    metrics = zeroshot_eval(model, tokenizer=open_clip.get_tokenizer("ViT-B-32", context_length=24),
                            preprocess=preprocess, zeroshot_dir=specs["zeroshot"],
                            device=torch.device("cpu"), batch_size=32)
    top1, top5, n = reference_counts(copy.deepcopy(model).eval(), zeroshot_dir=Path(specs["zeroshot"]),
                                     preprocess=preprocess)
    assert metrics == {"zeroshot_top1": top1 / n, "zeroshot_top5": top5 / n, "zeroshot_num_samples": 90}


def test_missing_directory_names_the_path(tmp_path):
    with pytest.raises(ZeroShotDataError, match=f"zero-shot directory {tmp_path / 'nope'} does not exist"):
        read_zeroshot_metadata(tmp_path / "nope")


@pytest.mark.parametrize("name, content, match", [
    ("classnames.json", None, r"classnames\.json is missing"),
    ("classnames.json", '{"a": 1}', r"classnames\.json must hold a non-empty JSON list"),
    ("classnames.json", "[oops", r"classnames\.json is not valid JSON"),
    ("templates.json", None, r"templates\.json is missing"),
    ("templates.json", '["a photo of a {}."]', r"templates\.json: templates .* lack the '\{c\}' class slot"),
])
def test_malformed_metadata_names_the_file(swatches, name, content, match):
    root, _ = swatches
    path = root / name
    path.unlink() if content is None else path.write_text(content)
    with pytest.raises(ZeroShotDataError, match=match) as err:
        zeroshot_eval(fake_model(), tokenizer=tokenizer(), preprocess=to_tensor, zeroshot_dir=root,
                      device=torch.device("cpu"))
    assert str(path) in str(err.value)


def test_no_shards_names_the_directory(swatches):
    root, _ = swatches
    for shard in root.glob("*.tar"):
        shard.unlink()
    with pytest.raises(ZeroShotDataError, match=f"{root} has no \\*.tar shards"):
        zeroshot_eval(fake_model(), tokenizer=tokenizer(), preprocess=to_tensor, zeroshot_dir=root,
                      device=torch.device("cpu"))


@pytest.mark.parametrize("label, match", [
    (8, r"000000\.tar:000000000: class 8 is outside \[0, 8\)"),
    ("x", r"000000\.tar:000000000: \.cls b'x' is not an integer class index"),
])
def test_bad_label_names_shard_and_key(tmp_path, label, match):
    write_zeroshot_shards(tmp_path, [[(0, label)]])
    with pytest.raises(ZeroShotDataError, match=match):
        zeroshot_eval(fake_model(), tokenizer=tokenizer(), preprocess=to_tensor, zeroshot_dir=tmp_path,
                      device=torch.device("cpu"))


def test_sample_without_image_names_its_members(tmp_path):
    write_zeroshot_shards(tmp_path, [[(0, 0)]])
    with tarfile.open(tmp_path / "000001.tar", "w") as tar:
        info = tarfile.TarInfo("000000009.cls")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"1"))
    with pytest.raises(ZeroShotDataError, match=r"000001\.tar:000000009 has members \['cls'\]"):
        zeroshot_eval(fake_model(), tokenizer=tokenizer(), preprocess=to_tensor, zeroshot_dir=tmp_path,
                      device=torch.device("cpu"))


def test_empty_set_is_an_error(tmp_path):
    write_zeroshot_shards(tmp_path, [[]])
    with pytest.raises(ValueError, match=f"zero-shot set {tmp_path} yielded no samples"):
        zeroshot_eval(fake_model(), tokenizer=tokenizer(), preprocess=to_tensor, zeroshot_dir=tmp_path,
                      device=torch.device("cpu"))


def test_oversized_and_corrupt_images_are_refused(tmp_path, monkeypatch):
    write_zeroshot_shards(tmp_path, [[(0, 0)]])
    monkeypatch.setattr(decode, "MAX_IMAGE_PIXELS", 24 * 24 - 1)
    with pytest.raises(ZeroShotDataError, match=r"000000000: unusable image \(decompression_bomb: 24x24 > 575"):
        list(datasets.zeroshot_batches(tmp_path, preprocess=to_tensor, num_classes=8, batch_size=4))
    with pytest.raises(ZeroShotDataError, match=r"x.tar:k: unusable image \(not_an_image\)"):
        datasets.decode_sample({"__url__": "x.tar", "__key__": "k", "jpg": b"not a jpeg", "cls": b"0"},
                               num_classes=8)
    with pytest.raises(ValueError, match="batch_size=0 must be >= 1"):
        next(datasets.zeroshot_batches(tmp_path, preprocess=to_tensor, num_classes=8, batch_size=0))
