"""Fused margin-softmax cross-entropy (SPEC section 1) without a ``B x C`` tensor.

Design. With ``c_ij = <n(x_i), n(w_j)>`` and the margin applied to the target only:

* The target cosine ``c_t`` is a gathered dot product (O(B*D)); the target logit and its derivative
  are computed on ``(B,)`` vectors in torch (:mod:`mdkernels.ops.margin`).
* Forward streams over class tiles computing ``s*c`` with the target column masked out, keeping an
  online max / sum-exp per row: the logsumexp over non-target classes. Classes are split over programs
  (split-C) and the per-split partials merged in torch. Rows are never normalised in memory: the raw
  ``x @ w^T`` tile is scaled by ``1/||x_i||`` and ``1/||w_j||``.
* Backward recomputes each tile, ``G = s*exp(s*c - lse)`` (non-target, unfiltered, in-range entries),
  accumulates ``dx^ += G n(W)`` and, only when the centers need a gradient, ``dW^ += G^T n(x)`` into
  fp32 buffers, adds the per-row target term with ``index_add``, and finishes with the normalisation
  backward (:mod:`mdkernels.ops.l2norm`). Only ``(B,)`` statistics are saved between the passes.

Backends: ``"triton"`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``) and ``"torch"``
(the same algorithm chunked over classes in torch: the CPU path). Both run under one
``torch.library`` op pair, so ``torch.compile(fullgraph=True)`` traces through either.
"""

from __future__ import annotations

import torch

from mdkernels import backends
from mdkernels._spec import compute_dtype
from mdkernels._validate import check_label_values
from mdkernels.ops._common.chunked import target_cos
from mdkernels.ops._common.epilogue import finish_center_grad, finish_embedding_grad
from mdkernels.ops._common.margin import margin_target_and_slope
from mdkernels.ops.l2norm import row_rnorm
from mdkernels.ops.margin_ce import cuda_backend, torch_backend, triton_backend


def _target_terms(x, w, labels_k, rx, rw, m2, s, m1, m3, fallback, grad, backend):
    """``(raw_t, z_t, slope)`` of every row (``labels_k < 0``: ignored): the CUDA row kernel for
    ``backend="cuda"``, else the gather-dot and :func:`margin_target_and_slope` in torch."""
    if backend == "cuda":  # gather, dot and margin in one row kernel
        return cuda_backend.target_terms(x, w, labels_k, rx, rw, m2, s, m1, m3, fallback, grad)
    _, _, raw_t = target_cos(x, w, labels_k, rx, rw, -1)
    z_t, slope = margin_target_and_slope(
        raw_t.clamp(-1.0, 1.0), m2.to(rx.dtype), s=s, m1=m1, m3=m3, fallback=fallback, grad=grad
    )
    return raw_t, z_t, slope


def forward_impl(
    x: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    m2: torch.Tensor,
    s: float,
    m1: float,
    m3: float,
    fallback: bool,
    grad: str,
    interclass_filter: float | None,
    ignore_index: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(loss_rows, lse, cos_target, rx, rw)``: per-row loss (0 for ignored rows), full
    logsumexp, clamped target cosine, and the inverse norms of the rows of x and w. ``grad`` only
    selects the backward's target derivative."""
    backends.require("margin_ce", backend, x)
    check_label_values(labels, w.shape[0], ignore_index)
    if backend in GRAD_HAT and -(-x.shape[0] // 64) > 65535:  # the backward grid's row tiles: CUDA's axis-1 cap
        raise ValueError(
            f"embeddings has {x.shape[0]} rows: the {backend} backward handles at most 65535 * 64 = 4194240 per "
            "call; split the batch, or use backend='torch'"
        )
    x, w, labels = x.contiguous(), w.contiguous(), labels.long().contiguous()
    rx, rw = row_rnorm(x), row_rnorm(w)
    valid = labels != ignore_index
    labels_k = torch.where(valid, labels, torch.full_like(labels, -1))
    raw_t, z_t, _ = _target_terms(x, w, labels_k, rx, rw, m2, s, m1, m3, fallback, "straight_through", backend)
    cos_t = raw_t.clamp(-1.0, 1.0)
    lse_nt = LSE_NONTARGET[backend](x, w, labels_k, rx, rw, s, interclass_filter)
    lse = torch.where(valid, torch.logaddexp(lse_nt, z_t), lse_nt)  # ignored rows: lse over all classes
    loss_rows = torch.where(valid, lse - z_t, torch.zeros_like(lse))
    return loss_rows, lse, cos_t, rx, rw



LSE_NONTARGET = {"triton": triton_backend.lse_nontarget, "cuda": cuda_backend.lse_nontarget,
                 "torch": torch_backend.lse_nontarget}  # fmt: skip
GRAD_HAT = {"triton": triton_backend.grad_hat, "cuda": cuda_backend.grad_hat}  # the torch path fuses its own dW epilogue



@torch.library.custom_op("mdkernels::margin_ce_forward", mutates_args=())
def margin_ce_forward(
    x: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    m2: torch.Tensor,
    s: float,
    m1: float,
    m3: float,
    fallback: bool,
    grad: str,
    interclass_filter: float | None,
    ignore_index: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused forward as a torch.library op (see :func:`forward_impl`)."""
    return forward_impl(x, w, labels, m2, s, m1, m3, fallback, grad, interclass_filter, ignore_index, backend)


@margin_ce_forward.register_fake
def _(x, w, labels, m2, s, m1, m3, fallback, grad, interclass_filter, ignore_index, backend):
    cd = compute_dtype(x)
    row = x.new_empty(x.shape[0], dtype=cd)
    return row, torch.empty_like(row), torch.empty_like(row), torch.empty_like(row), x.new_empty(w.shape[0], dtype=cd)


def backward_impl(
    grad_rows: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    m2: torch.Tensor,
    lse: torch.Tensor,
    rx: torch.Tensor,
    rw: torch.Tensor,
    s: float,
    m1: float,
    m3: float,
    fallback: bool,
    grad: str,
    interclass_filter: float | None,
    ignore_index: int,
    need_dw: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(dx, dw)``; ``dw`` is empty (0 elements) when ``need_dw`` is False: no dW GEMM runs."""
    x, w, labels = x.contiguous(), w.contiguous(), labels.long().contiguous()
    cd = rx.dtype
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    gr = torch.where(valid, grad_rows.to(cd), torch.zeros_like(lse))
    labels_k = torch.where(valid, labels, torch.full_like(labels, -1))
    raw_t, z_t, slope = _target_terms(x, w, labels_k, rx, rw, m2, s, m1, m3, fallback, grad, backend)
    # target term dL/dc_t = gr (p_t - 1) dz_t/dc_t, zero where the clamp of c_t was active
    coef = gr * (torch.exp(z_t - lse) - 1.0) * slope * ((raw_t >= -1.0) & (raw_t <= 1.0))
    xh = x.to(cd) * rx[:, None]
    if backend in GRAD_HAT:  # kernels: raw dx^ and dW^ in fp32 buffers, then the target term and the norm
        dxh, dwh = GRAD_HAT[backend](x, w, labels_k, rx, rw, lse, gr, s, interclass_filter, need_dw)
        if need_dw:
            dw = finish_center_grad(w, dwh, safe, coef, xh)
    else:
        dxh, dw = torch_backend.grad_hat(
            x,
            w,
            labels_k,
            rx,
            rw,
            lse,
            gr,
            s,
            interclass_filter,
            need_dw,
            target_dw=lambda rows: coef[rows, None] * xh[rows],
        )
    return finish_embedding_grad(x, dxh, w, safe, rw, coef), (dw if need_dw else w.new_empty(0))


@torch.library.custom_op("mdkernels::margin_ce_backward", mutates_args=())
def margin_ce_backward(
    grad_rows: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    m2: torch.Tensor,
    lse: torch.Tensor,
    rx: torch.Tensor,
    rw: torch.Tensor,
    s: float,
    m1: float,
    m3: float,
    fallback: bool,
    grad: str,
    interclass_filter: float | None,
    ignore_index: int,
    need_dw: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused backward as a torch.library op (see :func:`backward_impl`)."""
    return backward_impl(
        grad_rows,
        x,
        w,
        labels,
        m2,
        lse,
        rx,
        rw,
        s,
        m1,
        m3,
        fallback,
        grad,
        interclass_filter,
        ignore_index,
        need_dw,
        backend,
    )


@margin_ce_backward.register_fake
def _(
    grad_rows,
    x,
    w,
    labels,
    m2,
    lse,
    rx,
    rw,
    s,
    m1,
    m3,
    fallback,
    grad,
    interclass_filter,
    ignore_index,
    need_dw,
    backend,
):
    return torch.empty_like(x), (torch.empty_like(w) if need_dw else w.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, w, labels, m2, s, m1, m3, fallback, grad, tau, ignore_index, backend = inputs
    _, lse, _, rx, rw = output
    ctx.save_for_backward(x, w, labels, m2, lse, rx, rw)
    ctx.args = (s, m1, m3, fallback, grad, tau, ignore_index, backend)
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_rows, *_unused):
    x, w, labels, m2, lse, rx, rw = ctx.saved_tensors
    s, m1, m3, fallback, grad, tau, ignore_index, backend = ctx.args
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_dx or need_dw):
        return (None,) * 12
    dx, dw = margin_ce_backward(
        grad_rows,
        x,
        w,
        labels,
        m2,
        lse,
        rx,
        rw,
        s,
        m1,
        m3,
        fallback,
        grad,
        tau,
        ignore_index,
        need_dw,
        backend,
    )
    return (dx if need_dx else None), (dw if need_dw else None), *(None,) * 10


torch.library.register_autograd("mdkernels::margin_ce_forward", _backward, setup_context=_setup_context)
