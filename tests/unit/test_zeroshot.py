"""Zero-shot classification: known answers from a designed model, CLIP_benchmark's metric definitions."""
import numpy as np
import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from clipscale.config import EvalConfig
from clipscale.evaluate.datasets import open_eval_set
from clipscale.evaluate.runner import evaluate_model
from clipscale.evaluate.zeroshot import classification_metrics, zeroshot_classifier
from tests.eval_kit import DesignedCLIP, to_tensor, tokenizer, write_classification_set

# Offset of the stored label from the drawn class: 0 -> top-1 hit; 1..4 -> top-5 hit only.
OFFSETS = [0, 0, 3, 7, 0, 2, 5, 0, 1, 6, 0, 4, 0]


def run(model, root, *, batch_size=3, workers=0):
    cfg = EvalConfig(tasks=("zeroshot_classification",), batch_size=batch_size, num_workers=workers)
    [(task, _, metrics)] = evaluate_model(model, tokenizer=tokenizer(), preprocess=to_tensor,
                                          sets=[open_eval_set("swatches", str(root))], cfg=cfg,
                                          device=torch.device("cpu"))
    return metrics


@pytest.mark.parametrize("workers", [0, 2])
def test_accuracy_of_a_designed_model_is_known(tmp_path, workers):
    samples = [(i % 8, (i % 8 + off) % 8) for i, off in enumerate(OFFSETS)]
    root = write_classification_set(tmp_path / "zs", [samples[:7], samples[7:]])
    model = DesignedCLIP().train()
    rng = torch.get_rng_state()
    metrics = run(model, root, workers=workers)  # ragged batches across shards
    assert torch.equal(torch.get_rng_state(), rng), "evaluation during training must not move the training RNG"
    n = len(OFFSETS)
    labels = torch.tensor([label for _, label in samples])
    per_class = [np.mean([OFFSETS[i] == 0 for i in range(n) if labels[i] == c]) for c in labels.unique()]
    assert metrics == pytest.approx({"acc1": sum(o == 0 for o in OFFSETS) / n, "acc5": sum(o <= 4 for o in OFFSETS) / n,
                                     "mean_per_class_recall": float(np.mean(per_class))})
    assert model.modes_seen and not any(model.modes_seen), "images were encoded in train mode"
    assert model.training, "the model's train mode was not restored"


def test_mean_per_class_recall_on_unbalanced_classes():
    # class 0: 6 samples, 3 right; class 1: 2 samples, both right; class 2: 1 sample, wrong; class 3 absent
    labels = torch.tensor([0] * 6 + [1] * 2 + [2])
    predicted = torch.tensor([0, 0, 0, 1, 1, 3, 1, 1, 0])
    logits = torch.nn.functional.one_hot(predicted, 4).float()
    metrics = classification_metrics(logits, labels)
    assert metrics["acc1"] == pytest.approx(5 / 9)
    assert metrics["mean_per_class_recall"] == pytest.approx((3 / 6 + 2 / 2 + 0 / 1) / 3)
    assert "acc5" not in metrics  # fewer than 5 classes: CLIP_benchmark reports no top-5


def test_metrics_match_sklearn_and_an_argsort_reference():
    rng = np.random.default_rng(0)
    for num_classes in (5, 12):
        logits = rng.normal(size=(60, num_classes))
        labels = rng.integers(0, num_classes - 1, 60)  # the last class never occurs
        order = np.argsort(-logits, axis=1)
        got = classification_metrics(torch.from_numpy(logits), torch.from_numpy(labels))
        assert got["acc1"] == pytest.approx(np.mean(order[:, 0] == labels))
        assert got["acc5"] == pytest.approx(np.mean([labels[i] in order[i, :5] for i in range(60)]))
        assert got["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, order[:, 0]))


def test_classifier_is_the_renormalised_mean_of_unit_prompt_embeddings():
    torch.manual_seed(0)
    table = torch.randn(50000, 6, dtype=torch.float64)

    class Bag(torch.nn.Module):  # text embedding: sum of token vectors
        def encode_text(self, tokens):
            return table[tokens].sum(dim=1)

    tok = tokenizer()
    prompts = [["a red one.", "one red."], ["a blue one.", "a big blue one.", "blue."]]
    got = zeroshot_classifier(Bag(), tokenizer=tok, prompts=prompts, device=torch.device("cpu"))
    for c, class_prompts in enumerate(prompts):
        text = table[tok(class_prompts)].sum(dim=1)
        mean = (text / text.norm(dim=1, keepdim=True)).mean(dim=0)
        assert torch.allclose(got[:, c], (mean / mean.norm()).float())
