"""Fused margin-softmax cross-entropy (SPEC section 1) without a ``B x C`` tensor: the custom ops and autograd.

Design (flash attention with ``K = V = n(W)``). With ``c_ij = <n(x_i), n(w_j)>`` and the margin on the
target only:

* The target cosine is a gathered dot product (O(B*D)); the target logit and its derivative are computed
  on ``(B,)`` vectors (:mod:`mdkernels.ops._common.margin`, or the CUDA row kernel).
* Forward streams over class tiles: the non-target logits ``s*c`` feed an online max and sum-exp per row
  and, when the embeddings need a gradient, the accumulator ``sum_j p_ij (dz/dc)_ij n(w_j)``, rescaled
  whenever the max grows. That accumulator is the non-target part of ``dL/dn(x_i)`` up to the row's
  upstream gradient, so it is saved (``o_bar``, B x D in fp32) and the backward runs no GEMM for ``dx``.
  Classes are split over programs (split-C); the ``(m, l, O)`` partials merge as in flash-decoding.
* Backward, for trainable centers only: each program owns a class tile, loops over the rows, recomputes
  the logits with the saved logsumexp, folds the target term into ``G = dL/dc``, accumulates ``G^T n(x)``
  and finishes the normalisation backward of its rows through ``<n(w_j), dW^_j> = sum_i G_ij c_ij``. The
  gradient is written once, in the centers' dtype: no atomics, no fp32 ``C x D`` scratch.

GEMMs per step: 4 with trainable centers (2 forward, 2 backward), 2 with frozen ones, 1 for a forward
without gradient. Backends: ``triton_backend``, ``cuda_backend`` and ``torch_backend`` share one contract:
``forward(x, w, labels, rx, rw, s, tau, need_o) -> (lse_nt, o)`` and
``center_grad(x, w, labels, rx, rw, lse, gr, coef, raw_t, s, tau) -> dW``. One ``torch.library`` op pair
runs all of them, so ``torch.compile(fullgraph=True)`` traces through any.
"""

from __future__ import annotations

import torch

from mdkernels import backends
from mdkernels._spec import compute_dtype
from mdkernels._validate import check_label_values
from mdkernels.ops._common.chunked import target_cos
from mdkernels.ops._common.epilogue import embedding_grad
from mdkernels.ops._common.margin import margin_target_and_slope
from mdkernels.ops.l2norm import row_rnorm
from mdkernels.ops.margin_ce import cuda_backend, torch_backend, triton_backend

BACKENDS = {"triton": triton_backend, "cuda": cuda_backend, "torch": torch_backend}


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


def target_coefficient(gr, z_t, lse, raw_t, slope):
    """The target's ``dL/dc_t = gr (p_t - 1) dz_t/dc_t`` per row, zero where the clamp of ``c_t`` was active."""
    return gr * (torch.exp(z_t - lse) - 1.0) * slope * ((raw_t >= -1.0) & (raw_t <= 1.0))


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
    need_dx: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(loss_rows, lse, cos_target, rx, rw, o_bar)``: per-row loss (0 for ignored rows), full
    logsumexp, clamped target cosine, the inverse norms of the rows of x and w, and (``need_dx``)
    ``o_bar_i = sum_{j != y_i} p_ij (dz/dc)_ij n(w_j)`` ``(B, D)``, else ``(0, D)``. ``grad`` only selects the
    backward's target derivative."""
    backends.require("margin_ce", backend, x)
    check_label_values(labels, w.shape[0], ignore_index)
    x, w, labels = x.contiguous(), w.contiguous(), labels.long().contiguous()
    rx, rw = row_rnorm(x), row_rnorm(w)
    valid = labels != ignore_index
    labels_k = torch.where(valid, labels, torch.full_like(labels, -1))
    raw_t, z_t, _ = _target_terms(x, w, labels_k, rx, rw, m2, s, m1, m3, fallback, "straight_through", backend)
    cos_t = raw_t.clamp(-1.0, 1.0)
    lse_nt, o = BACKENDS[backend].forward(x, w, labels_k, rx, rw, s, interclass_filter, need_dx)
    lse = torch.where(valid, torch.logaddexp(lse_nt, z_t), lse_nt)  # ignored rows: lse over all classes
    loss_rows = torch.where(valid, lse - z_t, torch.zeros_like(lse))
    if need_dx:  # the non-target share of the softmax mass turns o (normalised over non-targets) into o_bar
        o_bar = o * torch.exp(lse_nt - lse).nan_to_num_(0.0)[:, None]
    else:
        o_bar = x.new_empty(0, x.shape[1], dtype=rx.dtype)
    return loss_rows, lse, cos_t, rx, rw, o_bar


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
    need_dx: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused forward as a torch.library op (see :func:`forward_impl`)."""
    return forward_impl(x, w, labels, m2, s, m1, m3, fallback, grad, interclass_filter, ignore_index, need_dx,
                        backend)  # fmt: skip


@margin_ce_forward.register_fake
def _(x, w, labels, m2, s, m1, m3, fallback, grad, interclass_filter, ignore_index, need_dx, backend):
    cd = compute_dtype(x)
    row = x.new_empty(x.shape[0], dtype=cd)
    o_bar = x.new_empty(x.shape[0] if need_dx else 0, x.shape[1], dtype=cd)
    return row, torch.empty_like(row), torch.empty_like(row), torch.empty_like(row), x.new_empty(w.shape[0], dtype=cd), o_bar


def backward_impl(
    grad_rows: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    m2: torch.Tensor,
    lse: torch.Tensor,
    rx: torch.Tensor,
    rw: torch.Tensor,
    o_bar: torch.Tensor,
    s: float,
    m1: float,
    m3: float,
    fallback: bool,
    grad: str,
    interclass_filter: float | None,
    ignore_index: int,
    need_dx: bool,
    need_dw: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(dx, dw)``, each empty (0 elements) when not needed. ``dx`` needs no GEMM (``o_bar``); ``dw``
    is the only pass over the classes, and there is none for frozen centers."""
    if need_dx and o_bar.shape[0] != x.shape[0]:
        raise ValueError("margin_ce_backward: dx needs the forward's o_bar; call the forward with need_dx=True")
    x, w, labels = x.contiguous(), w.contiguous(), labels.long().contiguous()
    cd = rx.dtype
    valid = labels != ignore_index
    gr = torch.where(valid, grad_rows.to(cd), torch.zeros_like(lse))
    labels_k = torch.where(valid, labels, torch.full_like(labels, -1))
    raw_t, z_t, slope = _target_terms(x, w, labels_k, rx, rw, m2, s, m1, m3, fallback, grad, backend)
    coef = target_coefficient(gr, z_t, lse, raw_t, slope)
    dx = embedding_grad(x, w, o_bar, gr, coef, labels_k, rw) if need_dx else x.new_empty(0)
    if need_dw:
        dw = BACKENDS[backend].center_grad(x, w, labels_k, rx, rw, lse, gr, coef, raw_t, s, interclass_filter)
    else:
        dw = w.new_empty(0)
    return dx, dw


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
    o_bar: torch.Tensor,
    s: float,
    m1: float,
    m3: float,
    fallback: bool,
    grad: str,
    interclass_filter: float | None,
    ignore_index: int,
    need_dx: bool,
    need_dw: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused backward as a torch.library op (see :func:`backward_impl`)."""
    return backward_impl(grad_rows, x, w, labels, m2, lse, rx, rw, o_bar, s, m1, m3, fallback, grad,
                         interclass_filter, ignore_index, need_dx, need_dw, backend)  # fmt: skip


@margin_ce_backward.register_fake
def _(grad_rows, x, w, labels, m2, lse, rx, rw, o_bar, s, m1, m3, fallback, grad, interclass_filter, ignore_index,
      need_dx, need_dw, backend):  # fmt: skip
    return (torch.empty_like(x) if need_dx else x.new_empty(0)), (torch.empty_like(w) if need_dw else w.new_empty(0))


def _setup_context(ctx, inputs, output):
    x, w, labels, m2, s, m1, m3, fallback, grad, tau, ignore_index, need_dx, backend = inputs
    _, lse, _, rx, rw, o_bar = output
    ctx.save_for_backward(x, w, labels, m2, lse, rx, rw, o_bar)
    ctx.args = (s, m1, m3, fallback, grad, tau, ignore_index)
    ctx.backend = backend
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_rows, *_unused):
    x, w, labels, m2, lse, rx, rw, o_bar = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if not (need_dx or need_dw):
        return (None,) * 13
    dx, dw = margin_ce_backward(grad_rows, x, w, labels, m2, lse, rx, rw, o_bar, *ctx.args, need_dx, need_dw,
                                ctx.backend)  # fmt: skip
    return (dx if need_dx else None), (dw if need_dw else None), *(None,) * 11


torch.library.register_autograd("mdkernels::margin_ce_forward", _backward, setup_context=_setup_context)
