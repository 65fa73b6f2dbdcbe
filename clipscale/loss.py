"""Contrastive losses (CLIP InfoNCE, SigLIP sigmoid) over the global batch, dense or tiled.

All functions are pure functions of the features, scale, bias and the process group; the only
collective is `clipscale.dist.gather_with_grad`. Gradient convention (open_clip `--gather-with-grad`):
each rank returns a scalar whose mean over ranks is the global-batch loss, and because the gather's
backward sums every rank's gradient for our rows, DDP's averaging of parameter gradients yields
exactly the gradient of the global-batch loss.

Tiled form (Inf-CL, Wang et al. 2024, "Breaking the Memory Barrier", sec. 3): the logits
S = logit_scale * A B^T + logit_bias are visited in (tile x tile) blocks, forward keeping only
running log-sum-exps, backward recomputing each block. Memory is O(B*D + tile^2) instead of O(B^2).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from clipscale.config import LossConfig
from clipscale.dist import gather_with_grad, rank


def contrastive_loss(
    cfg: LossConfig,
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """This rank's scalar loss for the configured kind, mode and form.

    image_features, text_features: (B_local, D), L2-normalised, equal B_local on every rank;
    logit_scale: scalar or (1,), already exp()'d; logit_bias: scalar, (1,) or None (required for SigLIP).
    Computed in (at least) float32 with autocast disabled, whatever the input dtype.
    """
    if cfg.kind == "siglip" and logit_bias is None:
        raise ValueError("loss.kind='siglip' needs logit_bias; build the model with init_logit_bias (e.g. -10)")
    dtype = torch.promote_types(image_features.dtype, torch.float32)
    image_features, text_features = image_features.to(dtype), text_features.to(dtype)
    # FSDP2 cannot shard 0-d parameters, so sharded models hold them as shape (1,): accept both.
    logit_scale = logit_scale.to(dtype).reshape(())
    logit_bias = logit_bias.to(dtype).reshape(()) if logit_bias is not None else None
    with torch.autocast(device_type=image_features.device.type, enabled=False):
        loss_fn = clip_loss if cfg.kind == "clip" else siglip_loss
        return loss_fn(image_features, text_features, logit_scale, logit_bias,
                       local_loss=cfg.local_loss, tile_size=cfg.tile_size if cfg.tiled else None)


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
    *,
    local_loss: bool = False,
    tile_size: int | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch (Radford et al. 2021, Fig. 3).

    image_features, text_features: (B_local, D); logit_scale, logit_bias: scalars.
    Row i of logits_per_image is image i against every text; its label is text i. With
    `local_loss` only this rank's rows (B_local, B_global) are used in each direction.
    `tile_size=None` materialises the logits; an int computes them in blocks.
    """
    all_image = gather_with_grad(image_features)  # (B_global, D)
    all_text = gather_with_grad(text_features)  # (B_global, D)
    if local_loss:
        offset = image_features.shape[0] * rank() if all_image.shape[0] != image_features.shape[0] else 0
        i2t = _cross_entropy(image_features, all_text, logit_scale, logit_bias, offset=offset, tile_size=tile_size)
        t2i = _cross_entropy(text_features, all_image, logit_scale, logit_bias, offset=offset, tile_size=tile_size)
        return (i2t + t2i) / 2
    if tile_size is None:
        logits_per_image = _logits(all_image, all_text, logit_scale, logit_bias)  # (B_global, B_global)
        labels = torch.arange(all_image.shape[0], device=all_image.device)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.T, labels)) / 2
    # One pass over the square logits gives both directions' log-sum-exps (rows and columns).
    row_lse, col_lse = _TiledLogSumExp.apply(all_image, all_text, logit_scale, _bias(logit_bias, all_image),
                                             tile_size, True)
    positives = _positive_logits(all_image, all_text, logit_scale, logit_bias)  # (B_global,)
    return (row_lse.mean() + col_lse.mean()) / 2 - positives.mean()


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor,
    *,
    local_loss: bool = False,
    tile_size: int | None = None,
) -> torch.Tensor:
    """Sigmoid loss (Zhai et al. 2023, eq. 1): -1/B sum_ij log sigmoid(z_ij (t x_i.y_j + b)).

    image_features, text_features: (B_local, D); z_ij = +1 for matching pairs, -1 otherwise.
    Uses -log sigmoid(-s) = softplus(s) and -log sigmoid(s) = softplus(s) - s, so the loss is
    (sum of softplus over all pairs - sum of positive logits) / B_rows. With `local_loss` this
    rank's images face all texts (open_clip SigLipLoss's semantics); otherwise every rank computes
    the whole (B_global, B_global) matrix.
    """
    all_text = gather_with_grad(text_features)  # (B_global, D)
    if local_loss:
        images = image_features  # (B_local, D)
        offset = image_features.shape[0] * rank() if all_text.shape[0] != image_features.shape[0] else 0
    else:
        images, offset = gather_with_grad(image_features), 0  # (B_global, D)
    texts_of_images = all_text[offset:offset + images.shape[0]]  # (B_rows, D): each image's own text
    positives = _positive_logits(images, texts_of_images, logit_scale, logit_bias)  # (B_rows,)
    if tile_size is None:
        softplus_sum = F.softplus(_logits(images, all_text, logit_scale, logit_bias)).sum()
    else:
        softplus_sum = _TiledSoftplusSum.apply(images, all_text, logit_scale, logit_bias, tile_size)
    return (softplus_sum - positives.sum()) / images.shape[0]


def _logits(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor,
            logit_bias: torch.Tensor | None) -> torch.Tensor:
    """(N, D), (M, D) -> (N, M) logits."""
    logits = logit_scale * a @ b.T
    return logits + logit_bias if logit_bias is not None else logits


def _positive_logits(a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor,
                     logit_bias: torch.Tensor | None) -> torch.Tensor:
    """Row-wise logits of matching pairs: (N, D), (N, D) -> (N,). O(N*D), no (N, N) matrix."""
    positives = logit_scale * (a * b).sum(dim=1)
    return positives + logit_bias if logit_bias is not None else positives


def _bias(logit_bias: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A scalar bias tensor; a constant zero when there is none (its gradient is then unused)."""
    return logit_bias if logit_bias is not None else like.new_zeros(())


def _cross_entropy(queries: torch.Tensor, keys: torch.Tensor, logit_scale: torch.Tensor,
                   logit_bias: torch.Tensor | None, *, offset: int, tile_size: int | None) -> torch.Tensor:
    """Mean cross-entropy of queries (N, D) against keys (M, D); query i's label is key i + offset."""
    if tile_size is None:
        labels = torch.arange(queries.shape[0], device=queries.device) + offset
        return F.cross_entropy(_logits(queries, keys, logit_scale, logit_bias), labels)
    row_lse, _ = _TiledLogSumExp.apply(queries, keys, logit_scale, _bias(logit_bias, queries), tile_size, False)
    positives = _positive_logits(queries, keys[offset:offset + queries.shape[0]], logit_scale, logit_bias)
    return (row_lse - positives).mean()


def _blocks(n: int, tile_size: int) -> list[slice]:
    return [slice(start, min(start + tile_size, n)) for start in range(0, n, tile_size)]


def _block_logsumexp(logits: torch.Tensor, *, dim: int) -> torch.Tensor:
    """logsumexp of a (tile, tile) block along `dim`.

    Read off the fused log_softmax kernel, lse = max(x) - max(log_softmax(x)): on CPU it is
    several times faster than torch.logsumexp (separate max / exp / sum / log passes). Taking both
    at the maximum (log_softmax is monotone) avoids cancellation: max(log_softmax) is in [-log n, 0].
    """
    return logits.amax(dim=dim) - torch.log_softmax(logits, dim=dim).amax(dim=dim)


def _logaddexp_(acc: torch.Tensor, value: torch.Tensor) -> None:
    """acc <- log(exp(acc) + exp(value)) in place; -inf + -inf stays -inf."""
    torch.logaddexp(acc, value, out=acc)


class _TiledLogSumExp(torch.autograd.Function):
    """Row (and optionally column) log-sum-exp of S = scale * A B^T + bias, block by block.

    Forward: A (N, D), B (M, D), scale, bias scalars -> row_lse (N,), col_lse (M,) (empty if
    `columns` is False). Backward recomputes each block: dS = g_row * softmax_rows(S) +
    g_col * softmax_cols(S), both softmaxes recovered from the saved log-sum-exps.
    """

    @staticmethod
    def forward(ctx, a, b, scale, bias, tile_size: int, columns: bool):
        row_lse = a.new_full((a.shape[0],), float("-inf"))
        col_lse = b.new_full((b.shape[0] if columns else 0,), float("-inf"))
        scaled_a = a * scale  # (N, D): scaling once is O(N*D) instead of O(N*M)
        for rows in _blocks(a.shape[0], tile_size):
            for cols in _blocks(b.shape[0], tile_size):
                logits = torch.addmm(bias, scaled_a[rows], b[cols].T)  # (tile, tile)
                _logaddexp_(row_lse[rows], _block_logsumexp(logits, dim=1))
                if columns:
                    _logaddexp_(col_lse[cols], _block_logsumexp(logits, dim=0))
        ctx.save_for_backward(a, b, scale, bias, row_lse, col_lse)
        ctx.tile_size, ctx.columns = tile_size, columns
        return row_lse, col_lse

    @staticmethod
    def backward(ctx, grad_row, grad_col):
        a, b, scale, bias, row_lse, col_lse = ctx.saved_tensors

        def grad_logits(logits: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
            # softmax entries from the saved log-sum-exps, in place to keep one extra tile live
            grad = torch.sub(logits, row_lse[rows, None]).exp_().mul_(grad_row[rows, None])
            if ctx.columns:
                grad.add_(logits.sub_(col_lse[None, cols]).exp_().mul_(grad_col[None, cols]))
            return grad

        return (*_tiled_backward(a, b, scale, bias, tile_size=ctx.tile_size, grad_logits=grad_logits), None, None)


class _TiledSoftplusSum(torch.autograd.Function):
    """sum_ij softplus(scale * A B^T + bias) block by block: A (N, D), B (M, D) -> scalar.

    d softplus(s)/ds = sigmoid(s); backward recomputes each block.
    """

    @staticmethod
    def forward(ctx, a, b, scale, bias, tile_size: int):
        total = a.new_zeros(())
        scaled_a = a * scale  # (N, D)
        for rows in _blocks(a.shape[0], tile_size):
            for cols in _blocks(b.shape[0], tile_size):
                total += F.softplus(torch.addmm(bias, scaled_a[rows], b[cols].T)).sum()
        ctx.save_for_backward(a, b, scale, bias)
        ctx.tile_size = tile_size
        return total

    @staticmethod
    def backward(ctx, grad_total):
        a, b, scale, bias = ctx.saved_tensors

        def grad_logits(logits: torch.Tensor, rows: slice, cols: slice) -> torch.Tensor:
            return torch.sigmoid_(logits).mul_(grad_total)

        return (*_tiled_backward(a, b, scale, bias, tile_size=ctx.tile_size, grad_logits=grad_logits), None)


def _tiled_backward(a, b, scale, bias, *, tile_size: int, grad_logits) -> tuple[torch.Tensor, ...]:
    """Gradients of a block-wise function of S = scale * A B^T + bias, recomputing each block.

    `grad_logits(logits, rows, cols)` maps a recomputed (tile, tile) block to dLoss/dS for it
    (it may overwrite `logits`). With G = dS @ B: dA = scale * G, dScale = sum(A * G), since
    dScale = sum_ij dS_ij <a_i, b_j>; dB = scale * dS^T @ A; dBias = sum(dS).
    """
    a_grad_unscaled, grad_b = torch.zeros_like(a), torch.zeros_like(b)  # (N, D), (M, D)
    grad_bias = bias.new_zeros(())
    scaled_a = a * scale
    for rows in _blocks(a.shape[0], tile_size):
        for cols in _blocks(b.shape[0], tile_size):
            grad = grad_logits(torch.addmm(bias, scaled_a[rows], b[cols].T), rows, cols)  # (tile, tile)
            grad_bias += grad.sum()
            a_grad_unscaled[rows] += grad @ b[cols]
            grad_b[cols] += grad.T @ scaled_a[rows]
    return scale * a_grad_unscaled, grad_b, (a * a_grad_unscaled).sum(), grad_bias
