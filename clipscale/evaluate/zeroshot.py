"""Zero-shot classification (Radford et al. 2021, sec. 3.1.2) with CLIP_benchmark's metrics.

The classifier is the prompt ensemble: per class, the mean of the unit-norm text embeddings of
every template, renormalised. An image is assigned the class whose classifier column has the
largest cosine similarity with its embedding.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from clipscale.evaluate.datasets import EvalSet
from clipscale.parallel import autocast


def zeroshot_classifier(model: torch.nn.Module, *, tokenizer: Callable, prompts: list[list[str]],
                        device: torch.device, precision: str = "fp32") -> torch.Tensor:
    """(D, C) unit columns: the mean normalised text embedding of each class's prompts (C lists of T)."""
    columns = []
    with torch.no_grad(), autocast(device, precision):
        for class_prompts in prompts:
            text = F.normalize(model.encode_text(tokenizer(class_prompts).to(device)).float(), dim=-1)  # (T, D)
            columns.append(F.normalize(text.mean(dim=0), dim=0))
    return torch.stack(columns, dim=1).cpu()  # (D, C)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """acc1, acc5 (only with >= 5 classes, as CLIP_benchmark) and mean_per_class_recall.

    logits (N, C), labels (N,). mean_per_class_recall is the mean over the classes present in
    `labels` of the fraction of their samples predicted correctly (balanced accuracy).
    """
    num_classes = logits.shape[1]
    top = logits.topk(min(5, num_classes), dim=1).indices  # (N, k)
    hit = top == labels[:, None]  # (N, k)
    metrics = {"acc1": hit[:, 0].double().mean().item()}
    if num_classes >= 5:
        metrics["acc5"] = hit.any(dim=1).double().mean().item()
    present = labels.unique()
    correct = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, labels, hit[:, 0].double())
    count = torch.bincount(labels, minlength=num_classes).double()
    metrics["mean_per_class_recall"] = (correct[present] / count[present]).mean().item()
    return metrics


def zeroshot_classification(model: torch.nn.Module, evalset: EvalSet, *, image_features: torch.Tensor,
                            labels: torch.Tensor, tokenizer: Callable, device: torch.device,
                            precision: str = "fp32") -> dict[str, float]:
    """Metrics of `model` on a classification set from its unit-norm image features (N, D)."""
    classifier = zeroshot_classifier(model, tokenizer=tokenizer, prompts=evalset.prompts(), device=device,
                                     precision=precision)
    return classification_metrics(image_features @ classifier, labels)  # logits (N, C)
