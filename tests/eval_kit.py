"""Tiny evaluation sets in CLIP_benchmark's layout and a model whose embeddings are designed."""
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image

# Eight well separated solid colours: an image of class k is drawn in PALETTE[k].
PALETTE = np.array([[r, g, b] for r in (30, 225) for g in (30, 225) for b in (30, 225)], dtype=np.float64)
CLASSNAMES = [f"swatch {name}" for name in ("ash", "bay", "cob", "dun", "elm", "fir", "gum", "hue")]
TEMPLATES = ["a photo of a {c}.", "a {c}.", "one {c} here."]


def tokenizer():
    return open_clip.get_tokenizer("ViT-B-32", context_length=16)


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)  # (3, H, W)


def swatch(k: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), tuple(int(v) for v in PALETTE[k])).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict[str, bytes]], *, first_key: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i, members in enumerate(samples):
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{first_key + i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_classification_set(root: Path, shards: list[list[tuple[int, int]]], *, split: str = "test") -> Path:
    """Shards of (drawn colour, stored label) swatches + classnames.txt + templates, CLIP_benchmark style."""
    key = 0
    for k, samples in enumerate(shards):
        write_tar(root / split / f"{k}.tar", [{"png": swatch(d), "cls": str(label).encode()} for d, label in samples],
                  first_key=key)
        key += len(samples)
    (root / split / "nshards.txt").write_text(f"{len(shards)}\n")
    (root / "classnames.txt").write_text("".join(f"{c}\n" for c in CLASSNAMES))
    (root / "zeroshot_classification_templates.txt").write_text("".join(f"{t}\n" for t in TEMPLATES))
    return root


def write_retrieval_set(root: Path, shards: list[list[tuple[int, list[str]]]]) -> Path:
    """Shards of (drawn colour, captions) swatches; captions as `txt` lines."""
    key = 0
    for k, samples in enumerate(shards):
        write_tar(root / "test" / f"{k}.tar", [{"png": swatch(d), "txt": "\n".join(caps).encode()}
                                               for d, caps in samples], first_key=key)
        key += len(samples)
    (root / "dataset_type.txt").write_text("retrieval\n")
    return root


class DesignedCLIP(torch.nn.Module):
    """Text: one-hot of the class named in the prompt. Image: scores 0.5 ** ((j - drawn colour) mod C),
    so the top-5 classes of an image of colour k are k, k+1, ..., k+4."""

    def __init__(self):
        super().__init__()
        self.tok = tokenizer()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.modes_seen: list[bool] = []
        ids = [self.tok([name])[0].tolist() for name in CLASSNAMES]
        self.name_ids = [row[1:row.index(0) - 1] if 0 in row else row[1:-1] for row in ids]  # no SOT / EOT

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        classes = [next(k for k, part in enumerate(self.name_ids) if _contains(row, part)) for row in tokens.tolist()]
        return torch.nn.functional.one_hot(torch.tensor(classes), len(PALETTE)).float() * self.scale

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        self.modes_seen.append(self.training)
        mean_rgb = images.mean(dim=(2, 3)).double() * 255  # (B, 3)
        drawn = torch.cdist(mean_rgb, torch.from_numpy(PALETTE)).argmin(dim=1)  # (B,)
        rank = (torch.arange(len(PALETTE))[None] - drawn[:, None]) % len(PALETTE)  # (B, C)
        return (0.5 ** rank.float()) * self.scale


def _contains(row: list[int], part: list[int]) -> bool:
    return any(row[i:i + len(part)] == part for i in range(len(row) - len(part) + 1))


def tiny_open_clip(seed: int = 0):
    """A tiny randomly initialised open_clip ViT (float64) with its transform and tokenizer."""
    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(
        "ViT-B-32", pretrained=None, embed_dim=16,
        vision_cfg=dict(image_size=32, layers=1, width=32, head_width=16, patch_size=8),
        text_cfg=dict(context_length=24, vocab_size=49408, width=32, heads=2, layers=1))
    return model.double().eval(), preprocess, open_clip.get_tokenizer("ViT-B-32", context_length=24)


def json_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]
