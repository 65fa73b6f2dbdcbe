"""Zero-shot classification accuracy of a CLIP-like model (Radford et al. 2021, sec. 3.1.2).

The classifier is open_clip's prompt ensemble: per class, the mean of the normalised text
embeddings of every template, renormalised (`open_clip.build_zero_shot_classifier`). An image is
assigned the class whose classifier column has the largest cosine similarity with its embedding.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import open_clip
import torch
import torch.nn.functional as F

from clipscale.evaluate.datasets import read_zeroshot_metadata, zeroshot_batches

log = logging.getLogger(__name__)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, *, ks: tuple[int, ...]) -> list[int]:
    """Number of rows of `logits` (N, C) whose label (N,) is among the k largest, for each k in ks.

    k is capped at C, so top-5 over fewer than 5 classes counts every sample.
    """
    max_k = min(max(ks), logits.shape[1])
    top = logits.topk(max_k, dim=1).indices  # (N, max_k)
    hit = top == labels[:, None]  # (N, max_k)
    return [int(hit[:, :min(k, max_k)].any(dim=1).sum()) for k in ks]


def zeroshot_eval(model: torch.nn.Module, *, tokenizer: Callable, preprocess: Callable,
                  zeroshot_dir: str | Path, device: torch.device,
                  batch_size: int = 256) -> dict[str, float]:
    """Top-1 / top-5 zero-shot accuracy on the set in `zeroshot_dir` (see evaluate.datasets).

    `model` provides `encode_image(images (B, 3, H, W)) -> (B, D)` and
    `encode_text(tokens, normalize=True) -> (T, D)`; `preprocess` maps a PIL image to (3, H, W).
    The model runs in eval mode without gradients and gets its previous mode back afterwards.
    Returns {"zeroshot_top1", "zeroshot_top5", "zeroshot_num_samples"}.
    """
    classnames, templates = read_zeroshot_metadata(zeroshot_dir)
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32  # bf16 models take bf16 inputs
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # open_clip formats string templates positionally ("{}"); ours name the slot "{c}".
            prompts = [lambda c, t=t: t.format(c=c) for t in templates]
            classifier = open_clip.build_zero_shot_classifier(
                model, tokenizer=tokenizer, classnames=classnames, templates=prompts,
                num_classes_per_batch=10, device=device)  # (D, C), unit columns
            correct1 = correct5 = num_samples = 0
            for images, labels in zeroshot_batches(zeroshot_dir, preprocess=preprocess,
                                                   num_classes=len(classnames), batch_size=batch_size):
                image_features = F.normalize(model.encode_image(images.to(device, dtype)), dim=-1)  # (B, D)
                logits = image_features @ classifier.to(image_features.dtype)  # (B, C)
                c1, c5 = topk_correct(logits, labels.to(device), ks=(1, 5))  # host sync
                correct1, correct5, num_samples = correct1 + c1, correct5 + c5, num_samples + len(labels)
    finally:
        model.train(was_training)
    if num_samples == 0:
        raise ValueError(f"zero-shot set {zeroshot_dir} yielded no samples; regenerate its shards")
    log.info("zero-shot on %s: top1=%.4f top5=%.4f n=%d", zeroshot_dir, correct1 / num_samples,
             correct5 / num_samples, num_samples)
    return {"zeroshot_top1": correct1 / num_samples, "zeroshot_top5": correct5 / num_samples,
            "zeroshot_num_samples": num_samples}
