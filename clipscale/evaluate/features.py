"""Image and text features of one split of an evaluation set, sharded over ranks.

Rank r reads units (shards or image files) r, r + W, ...; DataLoader workers split a rank's
units again and decode the images, while the model runs on the device. Every rank then holds the
features of the whole split, sorted by (unit, position), so the metrics computed from them equal
those of one process, whatever the world size. Collective: every rank calls `encode_split`.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clipscale import dist
from clipscale.evaluate.datasets import EvalDataError, EvalSet, decode_captions, decode_image, decode_label, \
    unit_samples
from clipscale.parallel import autocast

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SplitFeatures:
    """Unit-norm float32 features of a split, in the set's own order (identical on every rank)."""

    image_features: torch.Tensor  # (N, D)
    labels: torch.Tensor | None = None  # (N,) class indices of a classification set
    text_features: torch.Tensor | None = None  # (T, D) every caption of a retrieval set
    text_image_index: torch.Tensor | None = None  # (T,) the image each caption belongs to


class _Samples(IterableDataset):
    """(key (unit, position), image tensor, class index or captions) of this rank's and worker's units."""

    def __init__(self, evalset: EvalSet, units: list[Any], *, preprocess: Callable, rank: int, world_size: int):
        self.evalset, self.units, self.preprocess = evalset, units, preprocess
        self.mine = list(range(len(units)))[rank::world_size]

    def __iter__(self) -> Iterator[tuple[tuple[int, int], torch.Tensor, Any]]:
        worker = get_worker_info()
        mine = self.mine[worker.id::worker.num_workers] if worker else self.mine
        try:
            for unit in mine:
                for position, (where, members) in enumerate(unit_samples(self.units[unit])):
                    image = self.preprocess(decode_image(members, where=where))
                    if self.evalset.kind == "classification":
                        target = decode_label(members, where=where, num_classes=len(self.evalset.classnames))
                    else:
                        target = decode_captions(members, where=where)
                    yield (unit, position), image, target
        except EvalDataError as e:  # handed over as data: a worker's exception would arrive as a traceback
            yield (-1, -1), None, str(e)


def _collate(batch: list) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
    if batch[-1][1] is None:  # a data error ended this worker's samples: (None, None, message)
        return None, None, batch[-1][2]
    keys, images, targets = zip(*batch)
    targets = torch.tensor(targets, dtype=torch.long) if isinstance(targets[0], int) else list(targets)
    return torch.tensor(keys, dtype=torch.long), torch.stack(images), targets


def _encode_local(model: torch.nn.Module, evalset: EvalSet, split: str, *, preprocess: Callable,
                  tokenizer: Callable, device: torch.device, batch_size: int, num_workers: int,
                  precision: str) -> dict[str, torch.Tensor]:
    units = evalset.units(split)
    data = _Samples(evalset, units, preprocess=preprocess, rank=dist.rank(), world_size=dist.world_size())
    # Its own generator: the workers' seeds must not come from (and advance) the training RNG.
    loader = DataLoader(data, batch_size=batch_size, num_workers=min(num_workers, len(data.mine)),
                        collate_fn=_collate, pin_memory=device.type == "cuda", generator=torch.Generator())
    dtype = next(model.parameters()).dtype  # a bf16 model takes bf16 images
    out: dict[str, list[torch.Tensor]] = {"keys": [], "image": [], "labels": [], "text": [], "text_keys": []}
    with torch.no_grad(), autocast(device, precision):
        for keys, images, targets in loader:
            if images is None:
                raise EvalDataError(targets)
            features = model.encode_image(images.to(device, dtype, non_blocking=True))
            out["keys"].append(keys)
            out["image"].append(F.normalize(features.float(), dim=-1).cpu())  # (B, D), host sync
            if evalset.kind == "classification":
                out["labels"].append(targets)
                continue
            captions = [c for caps in targets for c in caps]
            text = model.encode_text(tokenizer(captions).to(device))
            out["text"].append(F.normalize(text.float(), dim=-1).cpu())  # (T_batch, D)
            out["text_keys"].append(torch.tensor([[*key, j] for key, caps in zip(keys.tolist(), targets)
                                                  for j in range(len(caps))], dtype=torch.long))
    return {k: torch.cat(v) for k, v in out.items() if v}


def _ordered(parts: list[dict[str, torch.Tensor]], kind: str) -> SplitFeatures:
    """Concatenate every rank's part and sort by key: the order of one process reading all units."""
    parts = [p for p in parts if "keys" in p]
    if not parts:
        raise EvalDataError("the split yielded no samples; its shards are empty: write samples into them")
    cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    image_keys = cat["keys"][:, 0] * 2**32 + cat["keys"][:, 1]  # (N,) unit-major order
    image_keys, order = image_keys.sort()
    if kind == "classification":
        return SplitFeatures(cat["image"][order], labels=cat["labels"][order])
    text_keys = cat["text_keys"][:, 0] * 2**32 + cat["text_keys"][:, 1]  # (T,) owning image
    text_order = torch.argsort(text_keys * 2**16 + cat["text_keys"][:, 2])
    return SplitFeatures(cat["image"][order], text_features=cat["text"][text_order],
                         text_image_index=torch.searchsorted(image_keys, text_keys[text_order]))


def encode_split(model: torch.nn.Module, evalset: EvalSet, split: str, *, preprocess: Callable,
                 tokenizer: Callable, device: torch.device, batch_size: int = 256, num_workers: int = 2,
                 precision: str = "fp32") -> SplitFeatures:
    """Features of `evalset`'s `split` on every rank (collective; one process without a process group).

    `model` provides `encode_image` and `encode_text` and is in eval mode. A data error on any rank
    is raised on every rank, so no rank waits forever in the gather.
    """
    t0 = time.perf_counter()
    try:
        local: dict[str, Any] = _encode_local(model, evalset, split, preprocess=preprocess, tokenizer=tokenizer,
                                              device=device, batch_size=batch_size, num_workers=num_workers,
                                              precision=precision)
    except EvalDataError as e:
        local = {"error": str(e)}
    parts = dist.gather_objects(local)
    errors = [p["error"] for p in parts if "error" in p]
    if errors:
        raise EvalDataError(errors[0])
    try:
        features = _ordered(parts, evalset.kind)
    except EvalDataError as e:
        raise EvalDataError(f"{evalset.root}/{split}: {e}") from None
    seconds = time.perf_counter() - t0
    log.info("encoded %s/%s: %d images in %.1fs (%.0f images/s)", evalset.name, split,
             len(features.image_features), seconds, len(features.image_features) / seconds)
    return features
