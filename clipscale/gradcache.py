"""Exact gradient caching: a global batch of any size with activation memory of one chunk.

Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup", sec. 3.
The loss depends on the parameters only through the embeddings, so one step is:

1. forward every chunk but the last without autograd and keep only its embeddings (B_local, D);
   forward the last chunk with autograd and keep its graph;
2. compute the (global, distributed) loss on the detached embeddings and its gradient with
   respect to them and to logit_scale / logit_bias;
3. backpropagate the last chunk's cached embedding gradients through its kept graph, then re-run
   every other chunk with autograd and backpropagate its cached embedding gradients.

Step 3 reproduces step 1 exactly because each replayed chunk's RNG state is saved before step 1
and restored before its replay, so dropout, drop-path and patch dropout draw the same masks. The
result equals the gradient of one backward through all chunks' graphs (to rounding), with peak
memory of one chunk's activations (plus the loss's, while the last chunk's graph is kept) and
O(B*D) embeddings. Keeping the last chunk's graph saves one of the K chunk forwards the cache
adds to a step: its extra cost is (K-1)/K of a forward, none when the batch is one chunk.

Gradient sync: with DDP (`DistributedDataParallel`) every backward but the last runs under
`model.no_sync()`; with FSDP2 (`fully_shard`) `set_requires_gradient_sync(False)` is used until
the last backward. The wrapper is detected from the model object; a `no_sync` context factory may be
passed instead for other wrappers.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import torch
from torch.distributed.fsdp import FSDPModule
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from clipscale.loss import LossConfig, contrastive_loss

NoSync = Callable[[], contextlib.AbstractContextManager]
_FEATURES = ("image_features", "text_features")
_SCALARS = ("logit_scale", "logit_bias")


@dataclasses.dataclass(frozen=True)
class _RngState:
    """CPU generator state, plus the CUDA generator of `device` when the batch lives on a GPU."""

    cpu: torch.Tensor
    cuda: torch.Tensor | None
    device: torch.device

    @classmethod
    def capture(cls, device: torch.device) -> _RngState:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(cpu=torch.get_rng_state(), cuda=cuda, device=device)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, self.device)


def gradcache_step(
    model: torch.nn.Module,
    images: torch.Tensor,
    texts: torch.Tensor,
    *,
    chunk_size: int,
    loss_cfg: LossConfig,
    no_sync: NoSync | None = None,
    scale_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Forward and backward this rank's batch in chunks; gradients as for one full-batch pass.

    model: open_clip CLIP built with `output_dict=True` (plain, DDP-wrapped or FSDP2-sharded);
    images: (B_local, C, H, W); texts: (B_local, L) token ids; chunk_size: samples per chunk
    (the last chunk may be smaller). Gradients are accumulated into `.grad` (call
    `zero_grad` before). Returns the detached scalar loss (this rank's `contrastive_loss`).
    Under `torch.autocast` the embeddings are cached and the loss computed in float32; the cached
    gradients are cast back to each chunk's output dtype for the replay. `scale_loss` (fp16:
    `GradScaler.scale`) is applied before the first backward, so the cached gradients and the
    replay carry the loss scale; the returned loss is unscaled.
    """
    _check_chunking(model, images, texts, chunk_size=chunk_size)
    *replayed, kept = list(zip(images.split(chunk_size), texts.split(chunk_size)))
    disable_sync = no_sync or _detect_no_sync(model)
    sync_unless_last = (lambda last: contextlib.nullcontext() if last else disable_sync())
    outputs, rng_states = _embed_without_grad(model, replayed)
    with sync_unless_last(not replayed):  # DDP decides at forward time whether the backward syncs
        kept_out = model(*kept)
    rng_after = _RngState.capture(images.device)
    outputs.append(_embeddings(kept_out))
    cached = {key: _float_leaf(torch.cat([o[key] for o in outputs])) for key in _FEATURES}  # (B_local, D)
    scalars = {key: _float_leaf(outputs[0][key]) for key in _SCALARS if key in outputs[0]}
    loss = contrastive_loss(loss_cfg, cached["image_features"], cached["text_features"],
                            scalars["logit_scale"], scalars.get("logit_bias"))
    # gradients w.r.t. the cached embeddings (and, across ranks, via the gather)
    (scale_loss(loss) if scale_loss else loss).backward()
    feature_grads = {key: cached[key].grad.split(chunk_size) for key in _FEATURES}
    # backward order: the kept chunk (index -1), then the replays; only the last backward syncs
    passes = [(-1, None), *enumerate(rng_states)]
    for position, (index, rng) in enumerate(passes):
        last = position == len(passes) - 1
        grads = {key: feature_grads[key][index] for key in _FEATURES}
        if last:  # logit_scale/bias enter the loss once: their gradient joins the synced backward
            grads.update({key: value.grad for key, value in scalars.items() if value.grad is not None})
        with sync_unless_last(last):
            if rng is None:
                out = kept_out
            else:
                rng.restore()
                out = model(*replayed[index])
            torch.autograd.backward([out[key] for key in grads],
                                    [grad.to(out[key].dtype) for key, grad in grads.items()])
    rng_after.restore()  # the next step draws after this one's masks, as without replays
    return loss.detach()


def _embed_without_grad(model: torch.nn.Module, chunks: list[tuple[torch.Tensor, torch.Tensor]],
                        ) -> tuple[list[dict[str, torch.Tensor]], list[_RngState]]:
    """First pass: each replayed chunk's outputs (no autograd graph) and the RNG state it started from."""
    outputs, rng_states = [], []
    with torch.no_grad():
        for chunk_images, chunk_texts in chunks:
            rng_states.append(_RngState.capture(chunk_images.device))
            outputs.append(_embeddings(model(chunk_images, chunk_texts)))
    return outputs, rng_states


def _embeddings(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: out[key] for key in (*_FEATURES, *_SCALARS) if out.get(key) is not None}


def _float_leaf(tensor: torch.Tensor) -> torch.Tensor:
    """A fresh autograd leaf in at least float32 (bf16/fp16 embeddings from autocast are upcast)."""
    dtype = torch.promote_types(tensor.dtype, torch.float32)
    return tensor.detach().to(dtype, copy=True).requires_grad_()


def _check_chunking(model: torch.nn.Module, images: torch.Tensor, texts: torch.Tensor, *, chunk_size: int) -> None:
    if chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size} must be positive: set train.chunk_size>0 or leave it unset")
    if images.shape[0] != texts.shape[0]:
        raise ValueError(f"images ({images.shape[0]}) and texts ({texts.shape[0]}) must have the same batch size")
    batch_norms = [name for name, module in model.named_modules() if isinstance(module, _BatchNorm)]
    if batch_norms:
        raise ValueError(
            f"gradient caching cannot be exact with BatchNorm (batch statistics differ per chunk), found "
            f"{batch_norms[:3]}: use a model with LayerNorm/GroupNorm or leave train.chunk_size unset")


def _detect_no_sync(model: torch.nn.Module) -> NoSync:
    """A factory of contexts that suspend gradient sync for this model's wrapper (or do nothing)."""
    inner = getattr(model, "_orig_mod", model)  # torch.compile keeps the wrapper here
    if isinstance(inner, DistributedDataParallel):
        return inner.no_sync
    if isinstance(inner, FSDPModule):
        return lambda: _fsdp_no_sync(inner)
    return contextlib.nullcontext


@contextlib.contextmanager
def _fsdp_no_sync(model: FSDPModule):
    """FSDP2: accumulate unsharded gradients locally; reduce-scatter happens on the last chunk."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
