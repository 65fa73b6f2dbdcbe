"""Writing small WebDataset shards for loader tests: any members, including malformed ones."""
import io
import json
import tarfile
from pathlib import Path

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem
from PIL import Image


def image_bytes(seed: int, *, size: int = 24, fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """A small random image encoded as `fmt` in PIL mode `mode`."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    img = Image.fromarray(pixels).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar with exactly these (name, bytes) members, in order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sample_members(key: str, seed: int) -> list[tuple[str, bytes]]:
    return [(f"{key}.jpg", image_bytes(seed)), (f"{key}.txt", f"caption {key}".encode())]


def write_dataset(directory: Path, sizes: list[int], *, with_sizes: bool = True) -> str:
    """Shards of the given sample counts with globally unique keys; returns the brace spec."""
    directory.mkdir(parents=True, exist_ok=True)
    n = 0
    for i, size in enumerate(sizes):
        members = [m for j in range(size) for m in sample_members(f"s{i:02d}_{j:04d}", n + j)]
        write_shard(directory / f"{i:06d}.tar", members)
        n += size
    if with_sizes:
        (directory / "sizes.json").write_text(json.dumps({f"{i:06d}.tar": s for i, s in enumerate(sizes)}))
    return f"{directory}/{{{0:06d}..{len(sizes) - 1:06d}}}.tar"


class FailingAfter:
    """A file that delivers its first `limit` bytes, then fails as a dropped connection does."""

    def __init__(self, f, limit: int) -> None:
        self.f, self.left = f, limit

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            raise ConnectionResetError(f"{self.f.path}: connection reset")
        data = self.f.read(self.left if n < 0 else min(n, self.left))
        self.left -= len(data)
        return data

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


class FlakyFileSystem(LocalFileSystem):
    """`flaky://PATH`: a local file; the first open of a path listed in `fail_after` fails after that
    many bytes, later opens read it whole."""

    protocol = "flaky"
    fail_after: dict[str, int] = {}

    def _open(self, path, mode="rb", **kwargs):
        f = super()._open(path, mode, **kwargs)
        limit = self.fail_after.pop(self._strip_protocol(path), None)
        return f if limit is None else FailingAfter(f, limit)


fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
