"""Gradient caching against one backward through the whole batch (float64, dropout on)."""
import pytest
import torch
from open_clip.loss import ClipLoss, SigLipLoss

from tests.models import tiny_clip
from clipscale.gradcache import gradcache_step
from clipscale.loss import LossConfig

BATCH = 10


def build(kind: str, *, dropout: float = 0.1, patch_dropout: float = 0.25, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = tiny_clip(dropout=dropout, patch_dropout=patch_dropout, logit_bias=-2.0 if kind == "siglip" else None)
    return model.double().train()


def batch(seed: int = 1, *, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, 3, 16, 16, generator=gen, dtype=dtype), torch.randint(0, 100, (BATCH, 8), generator=gen)


def open_clip_loss(kind: str, out: dict) -> torch.Tensor:
    """The reference loss, computed by open_clip (independent of clipscale.loss)."""
    if kind == "clip":
        return ClipLoss()(out["image_features"], out["text_features"], out["logit_scale"])
    return SigLipLoss()(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"])


def full_batch_reference(model, images, texts, *, kind: str, chunk_size: int, seed: int):
    """One autograd graph over all chunks, one backward: the exact full-batch gradient.

    Chunks are forwarded in order from the same seed, so they draw the same dropout and patch
    dropout masks as gradient caching's first pass; its replay must reproduce them.
    """
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    outs = [model(i, t) for i, t in zip(images.split(chunk_size), texts.split(chunk_size))]
    merged = {k: torch.cat([o[k] for o in outs]) for k in ("image_features", "text_features")}
    merged.update({k: outs[0][k] for k in ("logit_scale", "logit_bias") if outs[0].get(k) is not None})
    loss = open_clip_loss(kind, merged)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def gradcache(model, images, texts, *, seed: int, **kwargs):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = gradcache_step(model, images, texts, **kwargs)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_grads_close(got: dict, want: dict, *, rtol: float) -> None:
    scale = torch.cat([g.flatten() for g in want.values()]).norm()
    for name, g in want.items():
        err = (got[name] - g).norm()
        # relative per parameter; an absolute floor for gradients that vanish analytically
        assert err <= rtol * max(g.norm(), 1e-6 * scale), f"{name}: |diff|={err:.3e} |ref|={g.norm():.3e}"


@pytest.mark.parametrize("chunk_size", [3, 5, 16], ids=["ragged", "divides", "larger"])
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_gradcache_equals_full_batch_with_dropout(kind, chunk_size):
    model = build(kind)
    images, texts = batch()
    want_loss, want = full_batch_reference(model, images, texts, kind=kind, chunk_size=chunk_size, seed=7)
    loss, got = gradcache(model, images, texts, seed=7, chunk_size=chunk_size, loss_cfg=LossConfig(kind=kind))
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=0)
    assert_grads_close(got, want, rtol=1e-8)


def test_gradcache_equals_unchunked_forward_without_dropout():
    model = build("clip", dropout=0.0, patch_dropout=0.0)
    images, texts = batch()
    _, want = full_batch_reference(model, images, texts, kind="clip", chunk_size=BATCH, seed=0)
    _, got = gradcache(model, images, texts, seed=0, chunk_size=4, loss_cfg=LossConfig(kind="clip"))
    assert_grads_close(got, want, rtol=1e-8)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_gradcache_with_tiled_loss_and_activation_checkpointing(kind):
    model = build(kind)
    images, texts = batch(2)
    _, want = full_batch_reference(model, images, texts, kind=kind, chunk_size=4, seed=3)
    model.set_grad_checkpointing(True)
    cfg = LossConfig(kind=kind, tiled=True, tile_size=3)
    _, got = gradcache(model, images, texts, seed=3, chunk_size=4, loss_cfg=cfg)
    assert_grads_close(got, want, rtol=1e-8)


def test_gradcache_under_bf16_autocast_matches_chunked_reference():
    """Mixed precision: bf16 embeddings are cached in fp32, gradients cast back for the replay."""
    torch.manual_seed(0)
    model = tiny_clip(dropout=0.1, patch_dropout=0.25).train()
    images, texts = batch(dtype=torch.float32)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        want_loss, want = full_batch_reference(model, images, texts, kind="clip", chunk_size=4, seed=5)
        loss, got = gradcache(model, images, texts, seed=5, chunk_size=4, loss_cfg=LossConfig(kind="clip"))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, want_loss, rtol=1e-3, atol=1e-3)
    assert_grads_close(got, want, rtol=5e-2)


def test_loss_scale_scales_every_gradient_and_not_the_loss():
    """fp16 loss scaling: the cached embedding gradients and the replay both carry the scale."""
    model = build("clip")
    images, texts = batch()
    want_loss, want = gradcache(model, images, texts, seed=4, chunk_size=5, loss_cfg=LossConfig())
    loss, got = gradcache(model, images, texts, seed=4, chunk_size=5, loss_cfg=LossConfig(),
                          scale_loss=lambda value: value * 1024.0)
    assert loss == want_loss
    assert_grads_close({n: g / 1024.0 for n, g in got.items()}, want, rtol=1e-12)


@pytest.mark.parametrize(("chunk_size", "forwards"), [(3, 4 + 3), (5, 2 + 1), (16, 1)],
                         ids=["ragged", "divides", "one"])
def test_last_chunk_is_not_replayed_and_rng_continues_after_the_step(chunk_size, forwards):
    """K chunks cost 2K-1 forwards (the last keeps its graph), and the RNG ends where one pass over
    all chunks ends, so the next step's masks differ from this step's."""
    model = build("clip")
    images, texts = batch()
    calls = []
    model.visual.register_forward_hook(lambda *_: calls.append(1))
    torch.manual_seed(11)
    with torch.no_grad():
        for i, t in zip(images.split(chunk_size), texts.split(chunk_size)):
            model(i, t)
    want_rng = torch.get_rng_state()
    calls.clear()
    gradcache(model, images, texts, seed=11, chunk_size=chunk_size, loss_cfg=LossConfig())
    assert len(calls) == forwards
    assert torch.equal(torch.get_rng_state(), want_rng)


def test_gradcache_refuses_batchnorm():
    model = build("clip")
    model.visual.add_module("bn", torch.nn.BatchNorm1d(16))
    images, texts = batch()
    with pytest.raises(ValueError, match=r"cannot be exact with BatchNorm.*visual\.bn.*train.chunk_size unset"):
        gradcache_step(model, images, texts, chunk_size=4, loss_cfg=LossConfig())


def test_gradcache_refuses_bad_chunking():
    model = build("clip")
    images, texts = batch()
    with pytest.raises(ValueError, match="chunk_size=0 must be positive"):
        gradcache_step(model, images, texts, chunk_size=0, loss_cfg=LossConfig())
    with pytest.raises(ValueError, match=r"images \(10\) and texts \(9\)"):
        gradcache_step(model, images, texts[:9], chunk_size=4, loss_cfg=LossConfig())
