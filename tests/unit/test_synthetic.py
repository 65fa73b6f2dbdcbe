"""The synthetic dataset: valid shards, deterministic bytes, captions that match the pixels' truth."""
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import webdataset as wds
from PIL import Image

from clipscale.data.synthetic import write_synthetic_dataset

SMALL = dict(train_samples=360, samples_per_shard=100, zeroshot_samples=150, image_size=64, seed=3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    out = tmp_path_factory.mktemp("synthetic")
    return out, write_synthetic_dataset(out, **SMALL)


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {ext: bytes}} in member order, with plain tarfile."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def read_split(directory: Path) -> dict[str, dict[str, bytes]]:
    samples = {}
    for shard in sorted(directory.glob("*.tar")):
        samples.update(read_tar(shard))
    return samples


def test_layout_members_and_sizes(dataset):
    out, specs = dataset
    assert specs == {"train": str(out / "train" / "{000000..000003}.tar"), "zeroshot": str(out / "zeroshot")}
    zeroshot_test = out / "zeroshot" / "test"  # CLIP_benchmark's layout: test/{0..n-1}.tar + nshards.txt
    assert (zeroshot_test / "nshards.txt").read_text() == "2\n"
    zeroshot_sizes = {"0.tar": 100, "1.tar": 50}
    for split, exts, total in (("train", {"jpg", "txt", "json"}, 360), ("zeroshot/test", {"jpg", "cls", "json"}, 150)):
        sizes = json.loads((out / split / "sizes.json").read_text()) if split == "train" else zeroshot_sizes
        shards = sorted((out / split).glob("*.tar"))
        assert sorted(sizes) == [p.name for p in shards]
        assert all(re.fullmatch(r"\d{6}\.tar" if split == "train" else r"\d\.tar", p.name) for p in shards)
        keys = []
        for shard in shards:
            with tarfile.open(shard) as tar:
                names = tar.getnames()
            assert all(re.fullmatch(r"\d{9}\.(jpg|txt|json|cls)", n) for n in names), names[:5]
            samples = read_tar(shard)
            assert sizes[shard.name] == len(samples)
            assert all(set(members) == exts for members in samples.values())
            keys += list(samples)
        assert keys == [f"{i:09d}" for i in range(total)]
    assert not list(out.rglob(".*")), "temporary files left behind"
    classnames = (out / "zeroshot" / "classnames.txt").read_text().splitlines()
    templates = (out / "zeroshot" / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert len(classnames) == len(set(classnames)) >= 20
    assert 4 <= len(templates) <= 8 and all("{c}" in t for t in templates)


def test_webdataset_reads_every_train_sample(dataset):
    out, specs = dataset
    ds = wds.WebDataset(specs["train"], shardshuffle=False, nodesplitter=None, empty_check=False,
                        handler=wds.warn_and_continue)
    keys = [s["__key__"] for s in ds]
    assert keys == [f"{i:09d}" for i in range(SMALL["train_samples"])]


@pytest.mark.slow
def test_bytes_depend_on_seed_only_not_on_processes(dataset, tmp_path):
    out, _ = dataset
    again = tmp_path / "again"
    write_synthetic_dataset(again, **{**SMALL, "processes": 2})
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for f in files:
        assert (out / f).read_bytes() == (again / f).read_bytes(), f
    other = tmp_path / "other_seed"
    write_synthetic_dataset(other, **{**SMALL, "seed": SMALL["seed"] + 1})
    for shard in ("train/000000.tar", "zeroshot/test/0.tar"):
        assert (out / shard).read_bytes() != (other / shard).read_bytes()


def test_reuse_when_unchanged_and_regenerate_when_changed(tmp_path):
    params = dict(train_samples=50, samples_per_shard=20, zeroshot_samples=10, seed=1)
    write_synthetic_dataset(tmp_path, **params)
    first = (tmp_path / "train" / "000000.tar").stat().st_mtime_ns
    write_synthetic_dataset(tmp_path, **params)
    assert (tmp_path / "train" / "000000.tar").stat().st_mtime_ns == first
    specs = write_synthetic_dataset(tmp_path, **{**params, "train_samples": 30})
    assert specs["train"].endswith("{000000..000001}.tar")
    assert sorted(p.name for p in (tmp_path / "train").glob("*.tar")) == ["000000.tar", "000001.tar"]
    assert json.loads((tmp_path / "train" / "sizes.json").read_text()) == {"000000.tar": 20, "000001.tar": 10}
    assert json.loads((tmp_path / "dataset.json").read_text())["train_samples"] == 30


@pytest.mark.parametrize("bad, match", [
    (dict(train_samples=0), "train_samples=0 must be a positive integer"),
    (dict(image_size=8), "image_size=8 is too small"),
])
def test_bad_parameters_are_refused(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        write_synthetic_dataset(tmp_path, **bad)


def test_captions_tokenize_and_images_feed_an_open_clip_model(dataset):
    out, _ = dataset
    samples = list(read_split(out / "train").values())[:16]
    captions = [s["txt"].decode() for s in samples]
    tokens = open_clip.get_tokenizer("ViT-B-32")(captions)  # (16, 77)
    assert tokens.shape == (16, 77)
    assert ((tokens != 0).sum(dim=1) < 77).all(), "a caption was truncated"
    model, train_tf, val_tf = open_clip.create_model_and_transforms(
        "ViT-B-32", pretrained=None, embed_dim=16,
        vision_cfg=dict(image_size=32, layers=1, width=32, head_width=16, patch_size=8),
        text_cfg=dict(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    images = [Image.open(io.BytesIO(s["jpg"])) for s in samples]
    assert all(im.mode == "RGB" and im.size == (64, 64) for im in images)
    for transform in (train_tf, val_tf):
        batch = torch.stack([transform(im) for im in images])  # (16, 3, 32, 32)
        assert batch.shape == (16, 3, 32, 32)
        with torch.no_grad():
            image_features, text_features, _ = model(batch, tokens)[:3]
        assert image_features.shape == text_features.shape == (16, 16)
        assert torch.isfinite(image_features).all() and torch.isfinite(text_features).all()


def parse_words(text: str, *, colors: set[str], shapes: set[str]) -> dict[str, set[str]]:
    words = set(re.findall(r"[a-z]+", text))
    return {"color": words & colors, "shape": words & shapes, "words": words}


def test_captions_agree_with_attributes(dataset):
    out, _ = dataset
    samples = [(s["txt"].decode(), json.loads(s["json"])) for s in read_split(out / "train").values()]
    colors = {a["color"] for _, a in samples}
    shapes = {a["shape"] for _, a in samples}
    assert len(colors) >= 6 and len(shapes) >= 5
    sizes = {"small": {"small", "little"}, "large": {"large", "big"}}
    for caption, attrs in samples:
        main, _, distractor = caption.partition(" tiny ")  # "tiny" only ever names the distractor
        parsed = parse_words(main, colors=colors, shapes=shapes)
        assert parsed["color"] == {attrs["color"]} and parsed["shape"] == {attrs["shape"]}, caption
        for size, words in sizes.items():
            if parsed["words"] & words:
                assert attrs["size"] == size, caption
        place = parsed["words"] & {"top", "bottom", "left", "right", "center", "middle"}
        if place:
            expected = {"center", "middle"} if attrs["position"] == "center" else set(attrs["position"].split())
            assert place <= expected and (len(place) == 2 or attrs["position"] == "center"), caption
        if distractor:
            assert attrs["distractor"] is not None, caption
            d = parse_words(distractor, colors=colors, shapes=shapes)
            assert d["color"] == {attrs["distractor"]["color"]} and d["shape"] == {attrs["distractor"]["shape"]}
    assert sum(a["distractor"] is not None for _, a in samples) > 0
    assert sum(" tiny " in c for c, _ in samples) > 0


def test_zeroshot_labels_agree_with_attributes(dataset):
    out, _ = dataset
    classnames = (out / "zeroshot" / "classnames.txt").read_text().splitlines()
    samples = read_split(out / "zeroshot" / "test").values()
    labels = []
    for s in samples:
        attrs = json.loads(s["json"])
        labels.append(int(s["cls"].decode()))
        assert classnames[labels[-1]] == f"{attrs['color']} {attrs['shape']}"
    assert len(set(labels)) > len(classnames) / 2  # the held-out set covers many classes


def object_color_feature(jpg: bytes) -> np.ndarray:
    """Mean RGB of the pixels farthest from the background (estimated from the border)."""
    rgb = np.asarray(Image.open(io.BytesIO(jpg)), dtype=np.float64).reshape(-1, 3)  # (H*W, 3)
    side = int(np.sqrt(len(rgb)))
    img = rgb.reshape(side, side, 3)
    border = np.concatenate([img[:2].reshape(-1, 3), img[-2:].reshape(-1, 3),
                             img[:, :2].reshape(-1, 3), img[:, -2:].reshape(-1, 3)])
    distance = np.linalg.norm(rgb - np.median(border, axis=0), axis=1)
    return rgb[distance >= np.quantile(distance, 0.95)].mean(axis=0)


def test_colour_is_learnable_by_a_nearest_centroid_on_pixels(dataset):
    out, _ = dataset

    def features_and_colors(split):
        rows = [(object_color_feature(s["jpg"]), json.loads(s["json"])["color"])
                for s in read_split(out / split).values()]
        return np.stack([f for f, _ in rows]), np.array([c for _, c in rows])

    train_x, train_y = features_and_colors("train")
    test_x, test_y = features_and_colors("zeroshot/test")
    names = sorted(set(train_y))
    centroids = np.stack([train_x[train_y == c].mean(axis=0) for c in names])  # (n_colors, 3)
    predicted = np.array(names)[np.argmin(((test_x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)]
    accuracy = (predicted == test_y).mean()
    assert accuracy > 0.8, f"colour accuracy {accuracy:.2f} (chance {1 / len(names):.2f})"
