"""`eval-set`: a zero-shot classification or retrieval set in CLIP_benchmark's WebDataset layout.

    OUT/{split}/0.tar, 1.tar, ...   s0000000.{jpg|png|webp} + s0000000.cls (class index, as text)
                                    or s0000000.txt (retrieval: the image's captions, one per line)
    OUT/{split}/nshards.txt, sizes.json
    OUT/classnames.txt              one class name per line, line i = class i (classification)
    OUT/zeroshot_classification_templates.txt   one prompt template per line with a {c} slot

Classification reads an ImageFolder tree (FOLDER/CLASS/*.jpg; classes in sorted order, `_` shown
as a space); retrieval reads a captions table, rows with the same image giving its captions, or
image-text shards (one caption per image).
"""
from __future__ import annotations

import collections
import functools
import logging
import posixpath
from typing import Any, Iterable, Iterator

import fsspec

from clipscale.data.shards import BadSample, DataError, caption_text
from clipscale.data_tools.inputs import encode_image, list_images, read_bytes, read_table, resolve
from clipscale.data_tools.shardio import ShardWriter, parallel_map, read_shard, write_json, write_text
from clipscale.evaluate.datasets import DEFAULT_TEMPLATES, check_not_splits

log = logging.getLogger(__name__)


def read_templates(path: str) -> list[str]:
    """Prompt templates from a text file, one per line (blank lines ignored)."""
    try:
        with fsspec.open(path, "r", encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read templates file {path}: {e}") from None


def classification_items(folder: str) -> tuple[list[tuple[str, str]], list[str]]:
    """([(image URL, class index as text)], class names) of an ImageFolder tree; split folders
    (`train/`, `test/`, ...) are refused, not taken as classes."""
    images = [rel for rel in list_images(folder) if "/" in rel]
    classes = sorted({rel.split("/", 1)[0] for rel in images})
    if not classes:
        raise DataError(f"{folder} has no class folders with images; expected FOLDER/CLASS_NAME/IMAGE")
    base = folder.rstrip("/")
    check_not_splits(classes, where=folder, fix=f"make each split on its own: clipscale data eval-set {base}/test OUT "
                                                f"--split test (and {base}/train OUT --split train for a linear probe)")
    index = {c: i for i, c in enumerate(classes)}
    items = [(posixpath.join(folder, rel), str(index[rel.split("/", 1)[0]])) for rel in images]
    return items, [c.replace("_", " ") for c in classes]


def retrieval_items(folder: str, table: str, *, path_column: str, caption_column: str) -> list[tuple[str, str]]:
    """[(image URL, its captions joined by newlines)], images in order of first appearance in the table."""
    captions: dict[str, list[str]] = collections.defaultdict(list)
    for row in read_table(table, columns=(path_column, caption_column)):
        text = str(row[caption_column] or "").replace("\n", " ").strip()
        if text:
            captions[resolve(folder, str(row[path_column]))].append(text)
    return [(url, "\n".join(texts)) for url, texts in captions.items()]


def shard_items(urls: list[str], *, caption: str) -> Iterator[tuple[bytes, str]]:
    """(image bytes, caption) of every sample of some shards (an img2dataset download, say) whose
    caption the loader accepts: the source of a retrieval set."""
    counters: collections.Counter = collections.Counter()
    for url in urls:
        for sample in read_shard(url, caption=caption, counters=counters):
            try:
                yield sample["image"], caption_text(sample["caption"], caption=caption)
            except BadSample as e:
                log.warning("skipping %s in %s: %s", sample["__key__"], url, e.reason)


def encode_item(item: tuple[str | bytes, str], *, max_side: int | None) -> dict[str, Any]:
    """(image URL or bytes, label) -> the sample's members, or the reason it is skipped."""
    source, label = item
    try:
        data = source if isinstance(source, bytes) else read_bytes(source)
        ext, image, _ = encode_image(data, max_side=max_side, quality=None)
    except BadSample as e:
        return {"source": source if isinstance(source, str) else "shard sample", "reason": e.reason}
    return {"ext": ext, "image": image, "label": label.encode()}


def write_eval_set(items: Iterable[tuple[str | bytes, str]], out: str, *, split: str = "test", label: str,
                   classnames: list[str] | None = None, templates: list[str] | None = None,
                   samples_per_shard: int = 10_000, max_side: int | None = None, processes: int = 1) -> dict[str, Any]:
    """Write `items` (image URL or bytes, label text) as `out/split/*.tar` with `label` as the label's extension
    (`cls` or `txt`), plus classnames and templates for classification; returns a summary."""
    templates = list(templates or DEFAULT_TEMPLATES)
    bad = [t for t in templates if "{c}" not in t]
    if bad:
        raise DataError(f"templates {bad} lack the {{c}} class slot; write one template per line with {{c}}")
    fs, root = fsspec.core.url_to_fs(posixpath.join(out, split))
    if fs.exists(root) and fs.glob(posixpath.join(root, "*.tar")):
        raise DataError(f"{out}/{split} already holds shards; delete it or choose another output directory")
    encode = functools.partial(encode_item, max_side=max_side)
    sizes: list[int] = []
    skipped: collections.Counter = collections.Counter()
    writer = None
    try:
        for result in parallel_map(encode, items, processes=processes, desc="eval-set", unit="image",
                                   total=len(items) if isinstance(items, list) else None):
            if "reason" in result:
                skipped[result["reason"]] += 1
                log.warning("skipping %s: %s", result["source"], result["reason"])
                continue
            if writer is not None and writer.samples >= samples_per_shard:
                writer.commit()
                sizes.append(writer.samples)
                writer = None
            writer = writer or ShardWriter(posixpath.join(out, split, f"{len(sizes)}.tar"))
            key = f"s{sum(sizes) + writer.samples:07d}"  # CLIP_benchmark's keys: s + running index
            writer.write(key, {result["ext"]: result["image"], label: result["label"]})
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is None:
        raise DataError(f"no usable image among the inputs ({dict(skipped)}); check the image folder or shards")
    writer.commit()
    sizes.append(writer.samples)
    write_text(posixpath.join(out, split, "nshards.txt"), f"{len(sizes)}\n")
    write_json(posixpath.join(out, split, "sizes.json"), {f"{i}.tar": n for i, n in enumerate(sizes)})
    if classnames is not None:
        write_text(posixpath.join(out, "classnames.txt"), "".join(f"{c}\n" for c in classnames))
        write_text(posixpath.join(out, "zeroshot_classification_templates.txt"), "".join(f"{t}\n" for t in templates))
    return {"samples": sum(sizes), "shards": len(sizes), "skipped": dict(skipped)}
