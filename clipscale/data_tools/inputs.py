"""Reading what users bring: image folders, captions tables, sidecar captions; encoding one image.

A captions table is CSV, TSV, JSONL or parquet with a path column (relative to the image folder,
or absolute, or any fsspec URL) and a caption column. Without a table, every image under the folder
takes its caption from the `.txt` file beside it (img2dataset's `files` output looks like this).
"""
from __future__ import annotations

import csv
import io
import json
import posixpath
from typing import Any, Iterator

import fsspec
from PIL import Image

from clipscale.data.decode import open_image, to_rgb
from clipscale.data.shards import BadSample, DataError
from clipscale.data_tools.shardio import IMAGE_FORMATS

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def walk_images(folder: str) -> Iterator[str]:
    """Every image file under `folder` (recursive), as paths relative to it, in sorted order, one
    directory listed at a time (so memory follows the largest directory, not the whole tree)."""
    fs, root = fsspec.core.url_to_fs(folder)
    if not fs.isdir(root):
        raise DataError(f"image folder {folder} does not exist or is not a directory")
    found = False
    for rel in _walk(fs, root, root):
        found = True
        yield rel
    if not found:
        raise DataError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")


def _walk(fs: Any, root: str, directory: str) -> Iterator[str]:
    # a directory sorts as NAME/, so the walk yields exactly the sorted order of the relative paths
    entries = sorted(((posixpath.basename(e["name"].rstrip("/")) + ("/" if e["type"] == "directory" else ""), e)
                      for e in fs.ls(directory, detail=True)), key=lambda pair: pair[0])
    for name, entry in entries:
        path = posixpath.join(directory, name.rstrip("/"))
        if name.endswith("/"):
            yield from _walk(fs, root, path)
        elif name.lower().endswith(IMAGE_SUFFIXES):
            yield posixpath.relpath(path, root)


def list_images(folder: str) -> list[str]:
    """Every image file under `folder` (recursive), as sorted paths relative to it."""
    return list(walk_images(folder))


def iter_table(path: str, *, columns: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    """Rows of a CSV, TSV, JSONL or parquet file (by suffix), each with the given columns, read as a stream."""
    suffix = path.lower().rsplit(".", 1)[-1]
    if suffix not in ("csv", "tsv", "jsonl", "json", "parquet"):
        raise DataError(f"captions table {path}: unknown format {suffix!r}; use .csv, .tsv, .jsonl or .parquet")
    first = True
    try:
        for row in _rows(path, suffix):
            if first:
                missing = [c for c in columns if c not in row]
                if missing:
                    raise DataError(f"captions table {path} has no column {missing[0]!r} (columns: {sorted(row)}); "
                                    f"name the right one with --path-column / --caption-column")
                first = False
            yield row
    except DataError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read captions table {path}: {e}") from None
    if first:
        raise DataError(f"captions table {path} has no rows")


def _rows(path: str, suffix: str) -> Iterator[dict[str, Any]]:
    if suffix == "parquet":
        import pyarrow.parquet as pq  # only needed for parquet tables

        with fsspec.open(path, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches():
                yield from batch.to_pylist()
        return
    with fsspec.open(path, "r", encoding="utf-8", newline="") as f:
        if suffix in ("csv", "tsv"):
            yield from csv.DictReader(f, delimiter="\t" if suffix == "tsv" else ",")
        else:
            yield from (json.loads(line) for line in f if line.strip())


def read_table(path: str, *, columns: tuple[str, ...]) -> list[dict[str, Any]]:
    """Rows of a CSV, TSV, JSONL or parquet file (by suffix), each with the given columns."""
    return list(iter_table(path, columns=columns))


def table_pairs(folder: str, table: str, *, path_column: str, caption_column: str) -> Iterator[tuple[str, str]]:
    """(image URL, caption) per row of a captions table, paths resolved against `folder`, as a stream."""
    for row in iter_table(table, columns=(path_column, caption_column)):
        yield resolve(folder, str(row[path_column])), "" if row[caption_column] is None else str(row[caption_column])


def sidecar_pairs(folder: str) -> Iterator[tuple[str, str | None]]:
    """(image URL, caption from `stem.txt` beside it, None when there is none) for every image, as a stream."""
    fs, root = fsspec.core.url_to_fs(folder)
    for rel in walk_images(folder):
        sidecar = posixpath.join(root, posixpath.splitext(rel)[0] + ".txt")
        try:
            caption = fs.cat_file(sidecar).decode("utf-8", "replace") if fs.exists(sidecar) else None
        except OSError as e:
            raise DataError(f"cannot read caption file {sidecar}: {e}") from None
        yield resolve(folder, rel), caption


def resolve(folder: str, path: str) -> str:
    """A table's path: absolute paths and URLs as given, others relative to the image folder."""
    return path if path.startswith("/") or "://" in path else posixpath.join(folder, path)


def read_bytes(url: str) -> bytes:
    """A file's bytes; an error naming the file if it cannot be read."""
    try:
        with fsspec.open(url, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataError(f"cannot read image {url}: {e}; fix or remove it (or its row) and run again") from None


def encode_image(data: bytes, *, max_side: int | None, quality: int | None) -> tuple[str, bytes, tuple[int, int]]:
    """(extension, bytes, (width, height)) of an image as it goes into a shard; BadSample if unusable.

    Bytes are kept as they are unless needed otherwise: `quality` re-encodes every image as JPEG; a
    JPEG resized to `max_side` stays JPEG (quality 95); other resized images, and formats the loader
    does not select (it reads jpg, png, webp), become lossless PNG.
    """
    img = open_image(data)
    try:
        img.load()  # the whole image, so truncated files are caught here and not in training
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadSample("corrupt_image", str(e)) from None
    ext = IMAGE_FORMATS.get(img.format or "")
    too_large = max_side is not None and max(img.size) > max_side
    if ext is not None and not too_large and quality is None:
        return ext, data, img.size
    img = to_rgb(img)
    if too_large:
        img.thumbnail((max_side, max_side), Image.BICUBIC)
    out = io.BytesIO()
    if quality is not None or (ext == "jpg" and too_large):
        img.save(out, format="JPEG", quality=quality or 95)
        return "jpg", out.getvalue(), img.size
    img.save(out, format="PNG")
    return "png", out.getvalue(), img.size
