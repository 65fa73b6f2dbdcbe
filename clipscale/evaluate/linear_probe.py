"""Linear probe: multinomial logistic regression on frozen image features (Radford et al. 2021, sec. 3.2).

Full-batch L-BFGS in torch; the L2 weight decay is chosen on a validation split carved from the
train features (a fixed-seed 20%), then the probe is refitted on all train features and scored on
the test split with the classification metrics.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from clipscale.evaluate.zeroshot import classification_metrics

log = logging.getLogger(__name__)
WEIGHT_DECAYS = tuple(10.0**e for e in range(-6, 3))  # the sweep of CLIP's sec. 3.2, one point per decade
VAL_FRACTION = 0.2


def fit_logistic(features: torch.Tensor, labels: torch.Tensor, *, num_classes: int, weight_decay: float,
                 max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (D, C) and bias (C,) minimising mean cross-entropy + weight_decay / 2 * ||W||^2."""
    features = features.double()  # float64: the optimum does not depend on summation order
    weight = torch.zeros(features.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight + bias, labels) + weight_decay / 2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def _acc1(features: torch.Tensor, labels: torch.Tensor, probe: tuple[torch.Tensor, torch.Tensor]) -> float:
    weight, bias = probe
    return ((features.double() @ weight + bias).argmax(dim=1) == labels).double().mean().item()


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, *, num_classes: int, seed: int = 0) -> dict[str, float]:
    """Test metrics of the probe whose weight decay scored best on the validation split (ties: smallest)."""
    if len(train_labels) < 2:
        raise ValueError(f"a linear probe needs at least 2 train samples, got {len(train_labels)}; "
                         "write a larger train split")
    order = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(VAL_FRACTION * len(order)))
    val, fit = order[:n_val], order[n_val:]
    scores = [_acc1(train_features[val], train_labels[val],
                    fit_logistic(train_features[fit], train_labels[fit], num_classes=num_classes, weight_decay=wd))
              for wd in WEIGHT_DECAYS]
    best = WEIGHT_DECAYS[scores.index(max(scores))]
    log.info("linear probe: weight decay %.0e (validation acc1 %.4f)", best, max(scores))
    weight, bias = fit_logistic(train_features, train_labels, num_classes=num_classes, weight_decay=best)
    return classification_metrics(test_features.double() @ weight + bias, test_labels)
