"""Evaluation sets on disk, local or at any fsspec URL, in CLIP_benchmark's layouts.

WebDataset layout (CLIP_benchmark's `clip_benchmark_export_wds`, the LAION evaluation sets):

    ROOT/{split}/0.tar 1.tar ...          samples: an image (webp, jpg, jpeg, png) and
    ROOT/{split}/nshards.txt  (optional)    `cls` (class index) or captions (`txt`, one per line,
    ROOT/classnames.txt                     or `json`, a list of strings)
    ROOT/zeroshot_classification_templates.txt   one template per line with a `{c}` slot
    ROOT/dataset_type.txt     (optional)  "retrieval" or "classification"

ImageFolder layout: `ROOT/{split}/CLASS/*.jpg`, a classification set whose labels follow the folder
names, never their sorted places: without classnames.txt the class names are the folder names
(`_` shown as a space); classnames.txt maps `FOLDER<TAB>NAME` per line (line k = class index k), or
lists names that are the folder names, in any order; names that cannot be matched to folders are
refused, since an order cannot be checked. Split names (`train/`, `test/`, ...) as class folders
are refused. Without a templates file a tree takes open_clip's simple ImageNet templates.

A shard set without classnames.txt is a retrieval set, unless its name names ImageNet: then class
names and templates come from `open_clip.zero_shot_metadata` (also for a tree of 1,000 WordNet-id
folders, whose sorted order is ImageNet's class index). Only image bytes and the label or caption
members are read, never pickles. Every problem raises `EvalDataError` naming the file and the fix.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import posixpath
import re
from typing import Any, Iterator

import fsspec
import open_clip.zero_shot_metadata as zsm
from PIL import Image
from webdataset.tariterators import base_plus_ext

from clipscale.data.decode import open_image, to_rgb
from clipscale.data.shards import BAD_BYTES, IMAGE_EXTENSIONS, BadSample, DataError, extension, open_shard, \
    tar_members

CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"
DATASET_TYPE = "dataset_type.txt"
LABEL_EXTENSIONS = ("cls", "txt", "json")
SPLIT_NAMES = frozenset({"train", "test", "val", "validation"})
DEFAULT_TEMPLATES = tuple(t("{c}") for t in zsm.SIMPLE_IMAGENET_TEMPLATES)  # open_clip's 7 ImageNet prompts
READ_TIMEOUT_S = 300.0


class EvalDataError(DataError):
    """An evaluation set, its metadata or one of its samples is missing or malformed."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalSet:
    """One evaluation set: where it is, what it holds and the prompts used to classify it."""

    name: str
    """Name in the results table (`eval_dataset`)."""
    root: str
    """Directory or fsspec URL of the set."""
    kind: str
    """"classification" (images + class index) or "retrieval" (images + several captions)."""
    classnames: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()
    """Prompt templates with a `{c}` slot (empty for retrieval sets)."""
    folder_labels: tuple[tuple[str, int], ...] = ()
    """ImageFolder layout: (class folder, class index) pairs; empty for shards."""

    @property
    def eval_hash(self) -> str:
        """Hash of the class names, templates and folder labels: rows with different prompts never mix."""
        text = json.dumps([self.kind, self.classnames, self.templates] + ([self.folder_labels] if self.folder_labels
                                                                           else []))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def prompts(self) -> list[list[str]]:
        """Per class, its templates filled in: (C, T) strings."""
        return [[t.format(c=c) for t in self.templates] for c in self.classnames]

    def has_split(self, split: str) -> bool:
        fs, path = fsspec.core.url_to_fs(_join(self.root, split))
        return fs.isdir(path)

    def units(self, split: str) -> list[Any]:
        """What a split is read in: shard URLs, or (image file, class) pairs of an ImageFolder tree."""
        split_dir = _join(self.root, split)
        fs, path = fsspec.core.url_to_fs(split_dir)
        nshards = _join(split_dir, "nshards.txt")
        if fs.isfile(posixpath.join(path, "nshards.txt")):
            text = _read_text(nshards)
            if not text.strip().isdigit():
                raise EvalDataError(f"{nshards} holds {text.strip()[:40]!r}; write the number of shards")
            return [_join(split_dir, f"{i}.tar") for i in range(int(text))]
        shards = sorted((p for p in fs.glob(posixpath.join(path, "*.tar"))), key=_natural)
        if shards:
            return [_join(split_dir, posixpath.basename(p)) for p in shards]
        folders = class_folders(split_dir)
        if folders and self.folder_labels:
            labels = dict(self.folder_labels)
            unknown = [f for f in folders if f not in labels]
            if unknown:
                raise EvalDataError(f"{split_dir} has class folders {unknown[:5]} that the test split and "
                                    f"{_join(self.root, CLASSNAMES)} do not name; name them there as FOLDER<TAB>NAME")
            return [(_join(split_dir, posixpath.relpath(f, path)), labels[folder]) for folder in folders
                    for f in sorted(fs.find(posixpath.join(path, folder))) if extension(f) in IMAGE_EXTENSIONS]
        raise EvalDataError(f"{split_dir} has no *.tar shards or class folders; write the {split} split there "
                            f"as {split_dir}/0.tar, 1.tar, ... (CLIP_benchmark's layout)")


def class_folders(split_dir: str) -> list[str] | None:
    """The sorted class folders of an ImageFolder split; None when the split holds shards or is absent."""
    fs, path = fsspec.core.url_to_fs(split_dir)
    if not fs.isdir(path) or fs.isfile(posixpath.join(path, "nshards.txt")) or fs.glob(posixpath.join(path, "*.tar")):
        return None
    folders = sorted(posixpath.basename(p) for p in fs.ls(path, detail=False) if fs.isdir(p))
    check_not_splits(folders, where=split_dir, fix=f"point the evaluation set at {split_dir} itself (its "
                                                   "test/CLASS/ folders are the layout)")
    return folders or None


def check_not_splits(folders: list[str], *, where: str, fix: str) -> None:
    """Refuse split folders (`train/`, `test/`, ...) that would be taken as two classes."""
    splits = sorted(SPLIT_NAMES.intersection(folders))
    if len(splits) >= 2 or (splits and len(splits) == len(folders)):
        raise EvalDataError(f"{where} holds the split folders {splits}, not class folders: each would become a "
                            f"class; {fix}")


def folder_classes(url: str, folders: list[str], *, split_dir: str) -> tuple[tuple[str, ...], dict[str, int]]:
    """(class names, class index per folder name) of an ImageFolder tree from its classnames.txt at `url`:
    `FOLDER<TAB>NAME` lines, or names that are the folder names (`_` or space), in any order."""
    lines = _lines(url, what="FOLDER<TAB>NAME, one class per line (line k = class index k)")
    if any("\t" in line for line in lines):
        pairs = [[part.strip() for part in line.split("\t")] for line in lines]
        bad = next((line for line, p in zip(lines, pairs) if len(p) != 2 or not all(p)), None)
        if bad is not None:
            raise EvalDataError(f"{url}: line {bad!r} is not FOLDER<TAB>NAME; write one such line per class folder")
        names, index = tuple(name for _, name in pairs), {folder: k for k, (folder, _) in enumerate(pairs)}
    else:
        names, index = lines, {}
        for k, name in enumerate(lines):
            for spelling in (name, name.replace(" ", "_")):
                index.setdefault(spelling, k)
        if not set(folders) <= set(index):
            raise EvalDataError(
                f"{url} lists class names that are not the class folders of {split_dir} ({', '.join(folders[:3])}, "
                "...), so its order cannot be checked: taking line k for the k-th folder in sorted order silently "
                "mislabels names written in another order (names zero..nine over folders 0..9, or over folders "
                f"zero..nine sorted as eight, five, ...). Write one FOLDER<TAB>NAME line per class folder (e.g. "
                f"'{folders[0]}<TAB>{lines[0]}'), or name the folders by their classes, or delete {CLASSNAMES} to use "
                "the folder names")
    missing = [f for f in folders if f not in index]
    if missing:
        raise EvalDataError(f"{url} names no class for the folders {missing[:5]} of {split_dir}; add a line "
                            "FOLDER<TAB>NAME for each")
    return names, index


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def _natural(path: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", posixpath.basename(path))]


def _read_text(url: str) -> str:
    with fsspec.open(url, "rt", encoding="utf-8") as f:
        return f.read()


def _exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.isfile(path)


def _lines(url: str, *, what: str) -> tuple[str, ...]:
    lines = tuple(line.strip() for line in _read_text(url).splitlines() if line.strip())
    if not lines:
        raise EvalDataError(f"{url} is empty; write {what}, one per line")
    return lines


def read_templates(url: str) -> tuple[str, ...]:
    """Templates of a templates file, each checked to have exactly the `{c}` slot."""
    templates = _lines(url, what="prompt templates such as 'a photo of a {c}.'")
    for number, template in enumerate(templates, 1):
        try:
            ok = "{c}" in template and template.format(c="x") is not None
        except (KeyError, IndexError, ValueError):
            ok = False
        if not ok:
            raise EvalDataError(f"{url}: template {number} {template!r} needs a '{{c}}' slot for the class "
                                "name and no other braces; write e.g. 'a photo of a {c}.'")
    return templates


def open_eval_set(name: str, root: str) -> EvalSet:
    """Read and check the metadata of the set `name` at `root` (a directory or fsspec URL)."""
    fs, path = fsspec.core.url_to_fs(root)
    if not fs.isdir(path):
        raise EvalDataError(f"evaluation set {name}: {root} is not a directory; point it at a directory in "
                            f"CLIP_benchmark's layout (test/0.tar ..., {CLASSNAMES}, {TEMPLATES})")
    declared = _read_text(_join(root, DATASET_TYPE)).strip().lower() if _exists(_join(root, DATASET_TYPE)) else None
    if declared not in (None, "classification", "retrieval"):
        raise EvalDataError(f"{_join(root, DATASET_TYPE)} says {declared!r}; write 'classification' or 'retrieval'")
    imagenet = "imagenet" in name.lower()
    has_classnames = _exists(_join(root, CLASSNAMES))
    folders = class_folders(_join(root, "test")) if declared != "retrieval" else None
    if declared == "retrieval" or (declared is None and not has_classnames and not imagenet and folders is None):
        return EvalSet(name=name, root=root, kind="retrieval")
    index: dict[str, int] = {}
    if folders is not None and has_classnames:
        classnames, index = folder_classes(_join(root, CLASSNAMES), folders, split_dir=_join(root, "test"))
    elif folders is not None and imagenet and len(folders) == len(zsm.IMAGENET_CLASSNAMES):
        classnames, index = tuple(zsm.IMAGENET_CLASSNAMES), {f: k for k, f in enumerate(folders)}
    elif folders is not None:
        classnames, index = tuple(f.replace("_", " ") for f in folders), {f: k for k, f in enumerate(folders)}
    elif has_classnames:
        classnames = _lines(_join(root, CLASSNAMES), what="class names (line k = class index k)")
    elif imagenet:
        classnames = tuple(zsm.IMAGENET_CLASSNAMES)
    else:
        raise EvalDataError(f"{_join(root, CLASSNAMES)} is missing; write one class name per line "
                            "(line k names class index k)")
    if _exists(_join(root, TEMPLATES)):
        templates = read_templates(_join(root, TEMPLATES))
    elif imagenet:
        templates = tuple(t("{c}") for t in zsm.OPENAI_IMAGENET_TEMPLATES)
    elif folders is not None:
        templates = DEFAULT_TEMPLATES
    else:
        raise EvalDataError(f"{_join(root, TEMPLATES)} is missing; write one prompt template per line with a "
                            "'{c}' slot, e.g. 'a photo of a {c}.'")
    return EvalSet(name=name, root=root, kind="classification", classnames=classnames, templates=templates,
                   folder_labels=tuple(sorted(index.items())))


def unit_samples(unit: Any) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(where, members) of each sample of a shard URL or an ImageFolder (file, class) pair."""
    if isinstance(unit, tuple):
        url, label = unit
        with fsspec.open(url, "rb") as f:
            yield url, {extension(url): f.read(), "cls": str(label).encode()}
        return
    wanted = set(IMAGE_EXTENSIONS) | set(LABEL_EXTENSIONS)
    reader = open_shard(unit, timeout_s=READ_TIMEOUT_S)
    key, members = None, {}
    try:
        for name, data in tar_members(reader, select=lambda n: extension(n) in wanted):
            prefix, _ = base_plus_ext(name)
            if prefix != key and members:
                yield f"{unit}:{key}", members
                members = {}
            key, members[extension(name)] = prefix, data
        if members:
            yield f"{unit}:{key}", members
    except (*BAD_BYTES, OSError) as e:
        raise EvalDataError(f"{unit} cannot be read ({e}); the shard is truncated or corrupt: rewrite it") from None
    finally:
        reader.close()


def decode_image(members: dict[str, bytes], *, where: str) -> Image.Image:
    """The sample's image member -> RGB PIL image, with the training loader's header checks."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if ext is None:
        raise EvalDataError(f"{where} has members {sorted(members)}; a sample needs an image, one of "
                            f"{IMAGE_EXTENSIONS}: rewrite this sample")
    try:
        return to_rgb(open_image(members[ext]))
    except BadSample as e:
        raise EvalDataError(f"{where}.{ext}: unusable image ({e}); rewrite this sample") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise EvalDataError(f"{where}.{ext}: unusable image (corrupt_image: {e}); rewrite this sample") from None


def decode_label(members: dict[str, bytes], *, where: str, num_classes: int) -> int:
    """The class index of a classification sample, checked against the class names."""
    if "cls" not in members:
        raise EvalDataError(f"{where} has members {sorted(members)}; a classification sample needs 'cls' "
                            "(its class index as text)")
    try:
        label = int(members["cls"].decode().strip())
    except (ValueError, UnicodeDecodeError):
        raise EvalDataError(f"{where}.cls holds {members['cls'][:20]!r}; write the class index as an "
                            "integer") from None
    if not 0 <= label < num_classes:
        raise EvalDataError(f"{where}.cls: class {label} is outside [0, {num_classes}) of {CLASSNAMES}; "
                            f"write an index below {num_classes} or add the missing class names")
    return label


def decode_captions(members: dict[str, bytes], *, where: str) -> list[str]:
    """The captions of a retrieval sample: `txt` lines, or `json` holding a list of strings."""
    try:
        if "txt" in members:
            captions = [line.strip() for line in members["txt"].decode().splitlines() if line.strip()]
        elif "json" in members:
            captions = json.loads(members["json"])
        else:
            captions = None
    except (UnicodeDecodeError, ValueError):
        captions = None
    if not captions or not isinstance(captions, list) or not all(isinstance(c, str) and c for c in captions):
        hint = (f"; it has a class index, so the set lacks {CLASSNAMES} and {TEMPLATES}: write them beside the "
                "split to classify it") if "cls" in members else ""
        raise EvalDataError(f"{where} has no usable captions (members {sorted(members)}); a retrieval sample "
                            f"needs 'txt' with one caption per line or 'json' with a list of strings{hint}")
    return captions
