"""Hinton KD on margin logits (SPEC section 6), fused: no ``B x C`` tensor.

``loss_i = (1-a) (lse(z_s) - z_s,y) + a T^2 KL(softmax(z_t/T) || softmax(z_s/T))``; both logit sets are
against the same centers with the margin on the target, ``z = s*cos`` elsewhere.

One streaming pass over class tiles computes both cosine tiles (student and teacher rows against one
tile of centers) and keeps, per row, over non-target classes: the student max ``m_s`` with
``l_s = sum exp(z_s - m_s)`` and ``l_sT = sum exp((z_s - m_s)/T)``; the teacher max ``m_t`` with
``l_tT = sum exp((z_t - m_t)/T)`` and the cross term ``A = sum exp((z_t - m_t)/T) (z_t - z_s)``. All of
them are rescaled online when a max grows. The target terms are added on ``(B,)`` vectors, so that

    KL = (1/T) sum_j q_t,j (z_t,j - z_s,j) - lse_tT + lse_sT.

Backward recomputes both tiles: ``dL/dz_s = (1-a)(p_s - 1[y]) + a T (q_s - q_t)``. Gradients reach the
student embeddings and, through the student logits only, the centers. The teacher's logits are
targets, so neither the teacher embeddings nor the centers get a gradient through them.
"""

from __future__ import annotations

import math

import torch

from mdkernels import backends
from mdkernels._spec import compute_dtype
from mdkernels._validate import check_label_values
from mdkernels.ops._common.chunked import target_cos
from mdkernels.ops._common.epilogue import finish_center_grad, finish_embedding_grad
from mdkernels.ops._common.margin import margin_target_and_slope
from mdkernels.ops.l2norm import row_rnorm
from mdkernels.ops.margin_kd import torch_backend, triton_backend


def _targets(xs, xt, w, labels, rxs, rxt, rw, s, m1, m2, m3, fallback, ignore_index):
    valid, safe, raw_s = target_cos(xs, w, labels, rxs, rw, ignore_index)
    _, _, raw_t = target_cos(xt, w, labels, rxt, rw, ignore_index)
    m2v = torch.full_like(raw_s, m2)
    kw = dict(s=s, m1=m1, m3=m3, fallback=fallback, grad="exact")
    z_ts, slope = margin_target_and_slope(raw_s.clamp(-1.0, 1.0), m2v, **kw)
    z_tt, _ = margin_target_and_slope(raw_t.clamp(-1.0, 1.0), m2v, **kw)
    return valid, safe, raw_s, z_ts, z_tt, slope


def forward_impl(xs, xt, w, labels, T, alpha, s, m1, m2, m3, fallback, ignore_index, backend):
    """Returns ``(loss_rows, lse_s, lse_sT, lse_tT, rxs, rxt, rw)``, all ``(B,)`` but ``rw: (C,)``."""
    backends.require("margin_kd", backend, xs)
    check_label_values(labels, w.shape[0], ignore_index)
    xs, xt, w, labels = xs.contiguous(), xt.contiguous(), w.contiguous(), labels.long().contiguous()
    rxs, rxt, rw = row_rnorm(xs), row_rnorm(xt), row_rnorm(w)
    valid, _, _, z_ts, z_tt, _ = _targets(xs, xt, w, labels, rxs, rxt, rw, s, m1, m2, m3, fallback, ignore_index)
    labels_k = torch.where(valid, labels, torch.full_like(labels, -1))
    impl = triton_backend.stats if backend == "triton" else torch_backend.stats
    m_s, l_s, l_sT, m_t, l_tT, A = impl(xs, xt, w, labels_k, rxs, rxt, rw, s, T)
    # add the target class (valid rows only) to each statistic
    zs_t = torch.where(valid, z_ts, torch.full_like(z_ts, -math.inf))
    zt_t = torch.where(valid, z_tt, torch.full_like(z_tt, -math.inf))
    lse_s = torch.logaddexp(m_s + torch.log(l_s), zs_t)
    lse_sT = torch.logaddexp(m_s / T + torch.log(l_sT), zs_t / T)
    lse_tT = torch.logaddexp(m_t / T + torch.log(l_tT), zt_t / T)
    cross = A * torch.exp(m_t / T - lse_tT) + torch.where(
        valid, torch.exp(z_tt / T - lse_tT) * (z_tt - z_ts), torch.zeros_like(A)
    )
    kl = cross / T - lse_tT + lse_sT
    loss_rows = torch.where(valid, (1 - alpha) * (lse_s - z_ts) + alpha * T * T * kl, torch.zeros_like(kl))
    return loss_rows, lse_s, lse_sT, lse_tT, rxs, rxt, rw


def backward_impl(grad_rows, xs, xt, w, labels, lse_s, lse_sT, lse_tT, rxs, rxt, rw, T, alpha, s, m1, m2, m3,
                  fallback, ignore_index, need_dw, backend):  # fmt: skip
    xs, xt, w, labels = xs.contiguous(), xt.contiguous(), w.contiguous(), labels.long().contiguous()
    cd = rxs.dtype
    valid, safe, raw_s, z_ts, z_tt, slope = _targets(
        xs, xt, w, labels, rxs, rxt, rw, s, m1, m2, m3, fallback, ignore_index
    )
    gr = torch.where(valid, grad_rows.to(cd), torch.zeros_like(lse_s))
    dz_t = (1 - alpha) * (torch.exp(z_ts - lse_s) - 1) + alpha * T * (
        torch.exp(z_ts / T - lse_sT) - torch.exp(z_tt / T - lse_tT)
    )
    coef = gr * dz_t * slope * ((raw_s >= -1.0) & (raw_s <= 1.0))
    xsh = xs.to(cd) * rxs[:, None]
    labels_k = torch.where(valid, labels, torch.full_like(labels, -1))
    if backend == "triton":
        dxh, dwh = triton_backend.grad_hat(xs, xt, w, labels_k, rxs, rxt, rw, lse_s, lse_sT, lse_tT, gr, s, T, alpha,
                                           need_dw)  # fmt: skip
        dw = finish_center_grad(w, dwh, safe, coef, xsh) if need_dw else None
    else:
        dxh, dw = torch_backend.grad_hat(xs, xt, w, labels_k, rxs, rxt, rw, lse_s, lse_sT, lse_tT, gr, s, T, alpha,
                                         need_dw, target_dw=lambda rows: coef[rows, None] * xsh[rows])  # fmt: skip
    return finish_embedding_grad(xs, dxh, w, safe, rw, coef), (dw if need_dw else w.new_empty(0))


@torch.library.custom_op("mdkernels::margin_kd_forward", mutates_args=())
def margin_kd_forward(
    xs: torch.Tensor, xt: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, T: float, alpha: float, s: float,
    m1: float, m2: float, m3: float, fallback: bool, ignore_index: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The fused KD forward as a torch.library op (see :func:`forward_impl`)."""
    return forward_impl(xs, xt, w, labels, T, alpha, s, m1, m2, m3, fallback, ignore_index, backend)


@margin_kd_forward.register_fake
def _(xs, xt, w, labels, T, alpha, s, m1, m2, m3, fallback, ignore_index, backend):
    row = xs.new_empty(xs.shape[0], dtype=compute_dtype(xs))
    return (row, *(torch.empty_like(row) for _ in range(5)), xs.new_empty(w.shape[0], dtype=row.dtype))


@torch.library.custom_op("mdkernels::margin_kd_backward", mutates_args=())
def margin_kd_backward(
    grad_rows: torch.Tensor, xs: torch.Tensor, xt: torch.Tensor, w: torch.Tensor, labels: torch.Tensor,
    lse_s: torch.Tensor, lse_sT: torch.Tensor, lse_tT: torch.Tensor, rxs: torch.Tensor, rxt: torch.Tensor,
    rw: torch.Tensor, T: float, alpha: float, s: float, m1: float, m2: float, m3: float, fallback: bool,
    ignore_index: int, need_dw: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The fused KD backward as a torch.library op (see :func:`backward_impl`)."""
    return backward_impl(grad_rows, xs, xt, w, labels, lse_s, lse_sT, lse_tT, rxs, rxt, rw, T, alpha, s, m1, m2,
                         m3, fallback, ignore_index, need_dw, backend)  # fmt: skip


@margin_kd_backward.register_fake
def _(grad_rows, xs, xt, w, labels, lse_s, lse_sT, lse_tT, rxs, rxt, rw, T, alpha, s, m1, m2, m3, fallback,
      ignore_index, need_dw, backend):  # fmt: skip
    return torch.empty_like(xs), (torch.empty_like(w) if need_dw else w.new_empty(0))


def _setup_context(ctx, inputs, output):
    xs, xt, w, labels, *args = inputs
    _, lse_s, lse_sT, lse_tT, rxs, rxt, rw = output
    ctx.save_for_backward(xs, xt, w, labels, lse_s, lse_sT, lse_tT, rxs, rxt, rw)
    ctx.args = args
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_rows, *_unused):
    xs, xt, w, labels, lse_s, lse_sT, lse_tT, rxs, rxt, rw = ctx.saved_tensors
    T, alpha, s, m1, m2, m3, fallback, ignore_index, backend = ctx.args
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    if not (need_dx or need_dw):
        return (None,) * 13
    dx, dw = margin_kd_backward(grad_rows, xs, xt, w, labels, lse_s, lse_sT, lse_tT, rxs, rxt, rw, T, alpha, s, m1,
                                m2, m3, fallback, ignore_index, need_dw, backend)  # fmt: skip
    return (dx if need_dx else None), None, (dw if need_dw else None), *(None,) * 10


torch.library.register_autograd("mdkernels::margin_kd_forward", _backward, setup_context=_setup_context)

