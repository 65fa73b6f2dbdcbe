"""Zero-shot image-text retrieval Recall@K with several captions per image (CLIP_benchmark's definition).

image_retrieval_recall@K: over captions, the fraction whose image is among the K images most
similar to it. text_retrieval_recall@K: over images, the fraction with at least one of their own
captions among the K captions most similar to them.
"""
from __future__ import annotations

import torch

KS = (1, 5, 10)
CHUNK = 4096  # rows of the similarity matrix held at once


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor, text_image_index: torch.Tensor,
                      *, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """Recall@K both ways from unit-norm image (N, D) and text (T, D) features; caption t describes
    image `text_image_index[t]`. K larger than the candidates counts every query as a hit."""
    n_images, n_texts = len(image_features), len(text_features)
    image_hits = {k: 0 for k in ks}
    for start in range(0, n_texts, CHUNK):
        scores = text_features[start:start + CHUNK] @ image_features.T  # (t, N)
        top = scores.topk(min(max(ks), n_images), dim=1).indices  # (t, K)
        hit = top == text_image_index[start:start + CHUNK, None]
        for k in ks:
            image_hits[k] += int(hit[:, :k].any(dim=1).sum())
    text_hits = {k: 0 for k in ks}
    for start in range(0, n_images, CHUNK):
        scores = image_features[start:start + CHUNK] @ text_features.T  # (i, T)
        top = scores.topk(min(max(ks), n_texts), dim=1).indices  # (i, K)
        own = torch.arange(start, start + len(scores))[:, None]
        hit = text_image_index[top] == own  # (i, K): the retrieved caption belongs to the query image
        for k in ks:
            text_hits[k] += int(hit[:, :k].any(dim=1).sum())
    return {**{f"image_retrieval_recall@{k}": image_hits[k] / n_texts for k in ks},
            **{f"text_retrieval_recall@{k}": text_hits[k] / n_images for k in ks}}
