"""Retrieval Recall@K: constructed embeddings with known answers, duplicate captions, CLIP_benchmark's definition."""
import pytest
import torch
import torch.nn.functional as F
from clip_benchmark.metrics.zeroshot_retrieval import recall_at_k

from clipscale.config import EvalConfig
from clipscale.evaluate.datasets import open_eval_set
from clipscale.evaluate.retrieval import retrieval_metrics
from clipscale.evaluate.runner import evaluate_model
from tests.eval_kit import CLASSNAMES, DesignedCLIP, to_tensor, tokenizer, write_retrieval_set


def unit(*pairs: tuple[int, float]) -> torch.Tensor:
    v = torch.zeros(4)
    for i, w in pairs:
        v[i] = w
    return v / v.norm()


def test_constructed_embeddings_with_duplicate_captions():
    images = torch.eye(4)
    texts = torch.stack([unit((0, 1)), unit((0, 1)),  # image 0: the same caption twice
                         unit((1, 1), (0, 0.1)),  # image 1
                         unit((3, 1), (2, 0.5)),  # image 2: closer to image 3 -> a miss at 1, a hit at 5
                         unit((3, 1), (0, 0.9))])  # image 3: image 3 ranks it below image 2's caption
    owner = torch.tensor([0, 0, 1, 2, 3])
    got = retrieval_metrics(images, texts, owner, ks=(1, 5))
    assert got == {"image_retrieval_recall@1": 4 / 5, "image_retrieval_recall@5": 1.0,
                   "text_retrieval_recall@1": 3 / 4, "text_retrieval_recall@5": 1.0}


def test_matches_clip_benchmark_recall_on_random_embeddings():
    gen = torch.Generator().manual_seed(0)
    images = F.normalize(torch.randn(30, 8, generator=gen), dim=1)
    owner = torch.randint(0, 30, (70,), generator=gen)
    owner[:30] = torch.arange(30)  # every image has at least one caption
    texts = F.normalize(images[owner] + 0.9 * torch.randn(70, 8, generator=gen), dim=1)
    positives = torch.zeros(70, 30, dtype=torch.bool)
    positives[torch.arange(70), owner] = True
    got = retrieval_metrics(images, texts, owner)
    for k in (1, 5, 10):
        scores = texts @ images.T
        assert got[f"image_retrieval_recall@{k}"] == pytest.approx((recall_at_k(scores, positives, k) > 0).float().mean().item())
        assert got[f"text_retrieval_recall@{k}"] == pytest.approx((recall_at_k(scores.T, positives.T, k) > 0).float().mean().item())
    assert 0 < got["image_retrieval_recall@1"] < got["image_retrieval_recall@10"] < 1


def test_retrieval_set_through_the_pipeline(tmp_path):
    # colour 6's caption names colour 5 (no image has it): a miss both ways at K=1, without ties
    samples = [(k, [CLASSNAMES[k], f"a photo of a {CLASSNAMES[k]}."]) for k in range(5)] + [(6, [CLASSNAMES[5]])]
    root = write_retrieval_set(tmp_path, [samples[:4], samples[4:]])
    (root / "test" / "1.tar").rename(root / "test" / "9.tar")  # found by glob, no nshards.txt
    cfg = EvalConfig(tasks=("zeroshot_retrieval",), batch_size=4, num_workers=0)
    [(task, _, metrics)] = evaluate_model(DesignedCLIP(), tokenizer=tokenizer(), preprocess=to_tensor,
                                          sets=[open_eval_set("colours", str(root))], cfg=cfg,
                                          device=torch.device("cpu"))
    assert task == "zeroshot_retrieval"
    assert metrics["image_retrieval_recall@1"] == pytest.approx(10 / 11)
    assert metrics["text_retrieval_recall@1"] == pytest.approx(5 / 6)
    assert metrics["image_retrieval_recall@10"] == 1.0  # only 6 images
    assert metrics["text_retrieval_recall@10"] == pytest.approx(5 / 6)  # its own caption ranks 11th of 11
