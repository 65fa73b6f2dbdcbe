"""Linear probe: separable features are learned, weight decay is chosen on validation data."""
import pytest
import torch
import torch.nn.functional as F

from clipscale.evaluate import linear_probe as lp


def clusters(n: int, *, seed: int, spread: float) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(5, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = torch.randint(0, 5, (n,), generator=gen)
    return F.normalize(centres[labels] + spread * torch.randn(n, 16, generator=gen), dim=1), labels


def test_separable_features_reach_full_accuracy():
    train, test = clusters(200, seed=1, spread=0.05), clusters(100, seed=2, spread=0.05)
    metrics = lp.linear_probe(*train, *test, num_classes=5)
    assert metrics["acc1"] == metrics["mean_per_class_recall"] == 1.0 and metrics["acc5"] == 1.0


def test_weight_decay_is_chosen_on_validation_and_matters(monkeypatch):
    train, test = clusters(60, seed=3, spread=0.35), clusters(400, seed=4, spread=0.35)
    chosen = []
    real_fit = lp.fit_logistic
    monkeypatch.setattr(lp, "fit_logistic", lambda *a, **k: chosen.append(k["weight_decay"]) or real_fit(*a, **k))
    metrics = lp.linear_probe(*train, *test, num_classes=5)
    assert chosen[:-1] == list(lp.WEIGHT_DECAYS) and chosen[-1] in lp.WEIGHT_DECAYS  # sweep, then the refit
    assert metrics["acc1"] > 0.6
    weight, bias = lp.fit_logistic(*train, num_classes=5, weight_decay=100.0)
    assert weight.norm() < real_fit(*train, num_classes=5, weight_decay=1e-6)[0].norm()


def test_logistic_fit_reaches_the_regularised_optimum():
    features, labels = clusters(80, seed=5, spread=0.5)
    weight, bias = lp.fit_logistic(features, labels, num_classes=5, weight_decay=0.1)
    w, b = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    loss = F.cross_entropy(features.double() @ w + b, labels) + 0.05 * w.square().sum()
    loss.backward()
    assert w.grad.abs().max() < 1e-6 and b.grad.abs().max() < 1e-6


def test_too_few_train_samples_is_an_error():
    with pytest.raises(ValueError, match="a linear probe needs at least 2 train samples, got 1"):
        lp.linear_probe(torch.ones(1, 4), torch.zeros(1, dtype=torch.long), torch.ones(1, 4),
                        torch.zeros(1, dtype=torch.long), num_classes=2)
