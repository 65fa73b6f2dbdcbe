"""Contrastive losses against naive float64 references and open_clip's ClipLoss / SigLipLoss."""
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss

from clipscale.loss import LossConfig, contrastive_loss

B, D = 23, 8  # prime batch so tiles of 4, 5 and 7 leave ragged edges


def naive_clip(image, text, scale, bias=None):
    """InfoNCE written out entry by entry: mean over rows and columns of lse(S) - S_ii."""
    logits = scale * image @ text.T + (bias if bias is not None else 0.0)
    i2t = torch.stack([torch.logsumexp(logits[i], 0) - logits[i, i] for i in range(len(logits))]).mean()
    t2i = torch.stack([torch.logsumexp(logits[:, j], 0) - logits[j, j] for j in range(len(logits))]).mean()
    return (i2t + t2i) / 2


def naive_siglip(image, text, scale, bias):
    """Zhai et al. eq. 1 with an explicit +-1 label matrix."""
    logits = scale * image @ text.T + bias
    labels = 2 * torch.eye(len(logits), dtype=logits.dtype) - 1
    return -torch.log(torch.sigmoid(labels * logits)).sum() / len(logits)


def inputs(seed=0, *, batch=B, scale=7.5, bias=-3.0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, D, generator=gen, dtype=dtype), dim=1)
    text = F.normalize(image + 0.7 * torch.randn(batch, D, generator=gen, dtype=dtype), dim=1)
    return [image, text, torch.tensor(scale, dtype=dtype), torch.tensor(bias, dtype=dtype)]


def value_and_grads(fn, tensors):
    leaves = [t.clone().requires_grad_() for t in tensors]
    loss = fn(*leaves)
    loss.backward()
    return [loss.detach()] + [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]


def assert_all_close(actual, expected, *, rtol=1e-10, atol=1e-12):
    for name, a, e in zip(["loss", "image", "text", "scale", "bias"], actual, expected):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


TILINGS = [dict(tiled=False), dict(tiled=True, tile_size=4), dict(tiled=True, tile_size=7),
           dict(tiled=True, tile_size=64)]


@pytest.mark.parametrize("tiling", TILINGS, ids=lambda t: f"tile{t.get('tile_size', 'dense')}")
@pytest.mark.parametrize("local_loss", [False, True])
def test_clip_matches_naive_reference(tiling, local_loss):
    cfg = LossConfig(kind="clip", local_loss=local_loss, **tiling)
    x = inputs()
    got = value_and_grads(lambda i, t, s, b: contrastive_loss(cfg, i, t, s), x)
    want = value_and_grads(lambda i, t, s, b: naive_clip(i, t, s), x)
    assert_all_close(got, want)


@pytest.mark.parametrize("tiling", TILINGS, ids=lambda t: f"tile{t.get('tile_size', 'dense')}")
@pytest.mark.parametrize("local_loss", [False, True])
def test_siglip_matches_naive_reference(tiling, local_loss):
    cfg = LossConfig(kind="siglip", local_loss=local_loss, **tiling)
    x = inputs(1)
    got = value_and_grads(lambda i, t, s, b: contrastive_loss(cfg, i, t, s, b), x)
    want = value_and_grads(naive_siglip, x)
    assert_all_close(got, want)


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_clip_equals_open_clip(tiled, with_bias):
    cfg = LossConfig(kind="clip", tiled=tiled, tile_size=5)
    x = inputs(2)
    bias = (lambda b: b) if with_bias else (lambda b: None)
    got = value_and_grads(lambda i, t, s, b: contrastive_loss(cfg, i, t, s, bias(b)), x)
    want = value_and_grads(lambda i, t, s, b: ClipLoss()(i, t, s, bias(b)), x)
    assert_all_close(got, want)


@pytest.mark.parametrize("tiled", [False, True])
def test_siglip_equals_open_clip(tiled):
    cfg = LossConfig(kind="siglip", tiled=tiled, tile_size=5)
    x = inputs(3)
    got = value_and_grads(lambda i, t, s, b: contrastive_loss(cfg, i, t, s, b), x)
    want = value_and_grads(lambda i, t, s, b: SigLipLoss()(i, t, s, b), x)
    assert_all_close(got, want)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_tiled_is_stable_at_the_maximum_scale(kind):
    """logit_scale=100 with near-duplicate features: logits span +-100, exp would overflow fp32."""
    cfg = LossConfig(kind=kind, tiled=True, tile_size=6)
    x64 = inputs(4, scale=100.0, bias=-10.0)
    x32 = [t.float() for t in x64]
    got = value_and_grads(lambda i, t, s, b: contrastive_loss(cfg, i, t, s, b), x32)
    reference = naive_clip if kind == "clip" else naive_siglip
    want = value_and_grads(reference, x64)
    assert all(torch.isfinite(g).all() for g in got)
    assert_all_close([g.double() for g in got], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_low_precision_features_are_upcast_and_autocast_is_ignored(kind):
    cfg = LossConfig(kind=kind, tiled=True, tile_size=8)
    x = [t.to(torch.bfloat16) for t in inputs(5)]
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = contrastive_loss(cfg, *x)
    expected = (naive_clip(*[t.double() for t in x[:3]]) if kind == "clip"
                else naive_siglip(*[t.double() for t in x]))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_siglip_without_bias_is_refused():
    with pytest.raises(ValueError, match="needs logit_bias"):
        contrastive_loss(LossConfig(kind="siglip"), *inputs()[:3])


def test_non_positive_tile_size_is_refused():
    with pytest.raises(ValueError, match="tile_size=0 must be positive"):
        LossConfig(tiled=True, tile_size=0)
