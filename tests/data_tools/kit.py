"""Tiny inputs for the data tool tests: image folders, captions tables, reading shards back."""
import collections
import hashlib
import io
import tarfile
from pathlib import Path

import webdataset as wds

from tests.shard_kit import image_bytes


def image_folder(root: Path, n: int, *, sidecars: bool = True) -> list[str]:
    """`n` small JPEGs of varied sizes under root/sub{0,1}/ with `.txt` captions; returns their relative paths."""
    paths = []
    for i in range(n):
        rel = f"sub{i % 2}/img{i:03d}.jpg"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(image_bytes(i, size=12 + i % 7))
        if sidecars:
            (root / rel).with_suffix(".txt").write_text(f"caption number {i}")
        paths.append(rel)
    return paths


def tar_members(path) -> list[tuple[str, bytes]]:
    """(name, bytes) of every member of a tar, in order."""
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def wds_samples(urls: list[str]) -> list[dict]:
    """Samples as webdataset itself reads them (raw bytes per extension, no decoding)."""
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def sample_multiset(urls: list[str], *, image_exts=("jpg", "png", "webp")) -> collections.Counter:
    """(key, image digest, caption) of every sample read by webdataset, as a multiset."""
    out = collections.Counter()
    for s in wds_samples(urls):
        image = next(s[e] for e in image_exts if e in s)
        out[(s["__key__"], hashlib.sha1(image).hexdigest(), s["txt"].decode())] += 1
    return out


def png_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    return img.size
