"""Zero-shot classification sets on disk: WebDataset shards + classnames.json + templates.json.

A zero-shot directory holds shards `*.tar` whose samples carry an image (`{key}.jpg`, or png /
jpeg / webp) and a class index as text (`{key}.cls`), `classnames.json` (list of class names, index
= class) and `templates.json` (prompt templates with a `{c}` slot). Only the image and `.cls`
members are decoded, with PIL, never webdataset's generic decoder (which unpickles `.pyd/.pkl`).
Samples are read in shard order, on one process, so every evaluation sees the same images.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import webdataset as wds
from PIL import Image

from clipscale.data.decode import open_image, to_rgb
from clipscale.data.shards import IMAGE_EXTENSIONS, BadSample


class ZeroShotDataError(ValueError):
    """A zero-shot directory, its metadata or one of its samples is missing or malformed."""


def _read_json_list(path: Path, *, what: str) -> list[str]:
    if not path.is_file():
        raise ZeroShotDataError(f"{path} is missing; a zero-shot directory needs {what}")
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ZeroShotDataError(f"{path} is not valid JSON ({e}); write {what}") from e
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ZeroShotDataError(f"{path} must hold a non-empty JSON list of non-empty strings ({what})")
    return value


def read_zeroshot_metadata(zeroshot_dir: str | Path) -> tuple[list[str], list[str]]:
    """(classnames, templates) of a zero-shot directory, validated."""
    root = Path(zeroshot_dir)
    if not root.is_dir():
        raise ZeroShotDataError(
            f"zero-shot directory {root} does not exist; write one with data_tools/make_synthetic.py "
            "or point eval.zeroshot_dir at a directory of shards + classnames.json + templates.json")
    classnames = _read_json_list(root / "classnames.json", what='class names, e.g. ["red circle", ...]')
    templates = _read_json_list(root / "templates.json", what='prompt templates, e.g. ["a photo of a {c}."]')
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise ZeroShotDataError(f"{root / 'templates.json'}: templates {bad} lack the '{{c}}' class slot")
    return classnames, templates


def zeroshot_shards(zeroshot_dir: str | Path) -> list[str]:
    """Sorted shard paths (`*.tar`) of a zero-shot directory."""
    shards = sorted(str(p) for p in Path(zeroshot_dir).glob("*.tar"))
    if not shards:
        raise ZeroShotDataError(f"{zeroshot_dir} has no *.tar shards; write the zero-shot set there first")
    return shards


def decode_image(data: bytes, *, where: str) -> Image.Image:
    """Encoded image bytes -> RGB PIL image, with the training loader's header checks."""
    try:
        return to_rgb(open_image(data))
    except BadSample as e:
        raise ZeroShotDataError(f"{where}: unusable image ({e}); rewrite this sample") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ZeroShotDataError(f"{where}: unusable image (corrupt_image: {e}); rewrite this sample") from None


def decode_sample(sample: dict[str, Any], *, num_classes: int) -> tuple[Image.Image, int]:
    """A raw webdataset sample (bytes per member) -> (RGB image, class index)."""
    where = f"{sample.get('__url__')}:{sample.get('__key__')}"
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in sample), None)
    if image_ext is None or "cls" not in sample:
        raise ZeroShotDataError(f"{where} has members {sorted(k for k in sample if not k.startswith('__'))}; "
                                f"a zero-shot sample needs one of {IMAGE_EXTENSIONS} and 'cls'")
    try:
        label = int(sample["cls"].decode().strip())
    except ValueError as e:
        raise ZeroShotDataError(f"{where}: .cls {sample['cls'][:20]!r} is not an integer class index") from e
    if not 0 <= label < num_classes:
        raise ZeroShotDataError(f"{where}: class {label} is outside [0, {num_classes}) of classnames.json")
    return decode_image(sample[image_ext], where=where), label


def zeroshot_batches(zeroshot_dir: str | Path, *, preprocess: Callable[[Image.Image], torch.Tensor],
                     num_classes: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (images (B, 3, H, W) from `preprocess`, labels (B,) int64) in shard order."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1; pass e.g. batch_size=256")
    # One process reads everything: no node/worker splitting even if a process group exists.
    dataset = wds.WebDataset(zeroshot_shards(zeroshot_dir), shardshuffle=False, nodesplitter=None,
                             workersplitter=None, empty_check=False)
    images: list[torch.Tensor] = []
    labels: list[int] = []
    for sample in dataset:
        image, label = decode_sample(sample, num_classes=num_classes)
        images.append(preprocess(image))
        labels.append(label)
        if len(images) == batch_size:
            yield torch.stack(images), torch.tensor(labels, dtype=torch.long)
            images, labels = [], []
    if images:
        yield torch.stack(images), torch.tensor(labels, dtype=torch.long)
