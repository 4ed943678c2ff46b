"""Hinton KD on margin logits (docs/math.md §6), fused: no ``B x C`` tensor.

``loss_i = (1-a) (lse(z_s) - z_s,y) + a T^2 KL(softmax(z_t/T) || softmax(z_s/T))``; both logit sets are
against the same centers with the margin on the target, ``z = s*cos`` elsewhere.

One streaming pass over class tiles computes both cosine tiles (student and teacher rows against one
tile of centers) and keeps, per row, over non-target classes: the student max ``m_s`` with
``l_s = sum exp(z_s - m_s)`` and ``l_sT = sum exp((z_s - m_s)/T)``; the teacher max ``m_t`` with
``l_tT = sum exp((z_t - m_t)/T)`` and the cross term ``A = sum exp((z_t - m_t)/T) (z_t - z_s)``. All of
them are rescaled online when a max grows. The target terms are added on ``(B,)`` vectors, so that

    KL = (1/T) sum_j q_t,j (z_t,j - z_s,j) - lse_tT + lse_sT.

The student's gradient is ``dL/dz_s = (1-a)(p_s - 1[y]) + a T (q_s - q_t)``. As for the margin CE
(:mod:`mdkernels.ops.margin_ce.op`), the forward also accumulates, when the student needs a gradient,
``sum_j p_s n(w_j)``, ``sum_j q_s n(w_j)`` and ``sum_j q_t n(w_j)`` (three accumulators, one stacked dot),
so ``dx`` needs no GEMM; the backward only computes the centers' gradient, when they are trainable, with
each class tile's rows written once. The teacher's logits are targets: neither the teacher embeddings
nor the centers get a gradient through them.
"""

from __future__ import annotations

import math

import torch

from mdkernels._math import compute_dtype
from mdkernels._validate import label_mask
from mdkernels.ops._common import probe
from mdkernels.ops._common.chunked import target_cos
from mdkernels.ops._common.env import ieee_fp32_matmul, no_autocast, operand_dtype
from mdkernels.ops._common.epilogue import embedding_grad
from mdkernels.ops._common.margin import margin_target_and_slope
from mdkernels.ops.l2norm import row_rnorm
from mdkernels.ops.margin_kd import torch_backend, triton_backend

BACKENDS = {"triton": triton_backend, "torch": torch_backend}


def _targets(xs, xt, w, labels, rxs, rxt, rw, s, m1, m2, m3, fallback, ignore_index):
    valid, safe, raw_s = target_cos(xs, w, labels, rxs, rw, ignore_index)
    _, _, raw_t = target_cos(xt, w, labels, rxt, rw, ignore_index)
    m2v = torch.full_like(raw_s, m2)
    kw = dict(s=s, m1=m1, m3=m3, fallback=fallback, grad="exact")
    z_ts, slope, _ = margin_target_and_slope(raw_s.clamp(-1.0, 1.0), m2v, **kw)
    z_tt, _, _ = margin_target_and_slope(raw_t.clamp(-1.0, 1.0), m2v, **kw)
    return valid, safe, raw_s, z_ts, z_tt, slope


def forward_impl(xs, xt, w, labels, T, alpha, s, m1, m2, m3, fallback, ignore_index, need_dx, backend, op_dtype=""):
    """Returns ``(loss_rows, lse_s, lse_sT, lse_tT, rxs, rxt, rw, o_bar)``: ``(B,)`` vectors but ``rw: (C,)``
    and ``o_bar``, the non-target ``dL/dn(x_s)`` per unit of upstream gradient, ``(B, D)`` (``(0, D)``
    without ``need_dx``). ``op_dtype``: the dots' operand dtype under autocast, "" for the inputs' own. Any
    strides."""
    if backend not in BACKENDS:  # the plan (mdkernels._plan) chose and checked it: it is not asked again here
        raise ValueError(f"backend must be one of {sorted(BACKENDS)} (a plan's choice), got {backend!r}")
    with no_autocast(xs):
        labels = labels.long()
        labels_k = torch.where(label_mask(labels, w.shape[0], ignore_index), labels, torch.full_like(labels, -1))
        return _forward(xs, xt, w, labels_k, T, alpha, s, m1, m2, m3, fallback, need_dx, backend,
                        operand_dtype(op_dtype))  # fmt: skip


def _forward(xs, xt, w, labels_k, T, alpha, s, m1, m2, m3, fallback, need_dx, backend, op_dtype):
    rxs, rxt, rw = row_rnorm(xs), row_rnorm(xt), row_rnorm(w)
    valid, _, _, z_ts, z_tt, _ = _targets(xs, xt, w, labels_k, rxs, rxt, rw, s, m1, m2, m3, fallback, -1)
    (m_s, l_s, l_sT, m_t, l_tT, A), o3 = BACKENDS[backend].forward(xs, xt, w, labels_k, rxs, rxt, rw, s, T, need_dx,
                                                                  op_dtype=op_dtype)  # fmt: skip
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
    if need_dx:  # s [(1-a) sum p_s n(w) + a T (sum q_s n(w) - sum q_t n(w))], each accumulator normalised
        f_s, f_sT, f_tT = (torch.exp(v).nan_to_num_(0.0) for v in (m_s - lse_s, m_s / T - lse_sT, m_t / T - lse_tT))
        o_bar = o3[0] * (s * (1 - alpha) * f_s)[:, None] + (o3[1] * f_sT[:, None] - o3[2] * f_tT[:, None]) * (
            s * alpha * T
        )
    else:
        o_bar = xs.new_empty(0, xs.shape[1], dtype=rxs.dtype)
    return loss_rows, lse_s, lse_sT, lse_tT, rxs, rxt, rw, o_bar


def backward_impl(grad_rows, xs, xt, w, labels, lse_s, lse_sT, lse_tT, rxs, rxt, rw, o_bar, T, alpha, s, m1, m2, m3,
                  fallback, ignore_index, need_dx, need_dw, backend, op_dtype=""):  # fmt: skip
    """Returns ``(dx_s, dw)``, each empty when not needed: ``dx_s`` from ``o_bar`` (no GEMM), ``dw`` the only
    pass over the classes."""
    if need_dx and o_bar.shape[0] != xs.shape[0]:
        raise ValueError("margin_kd_backward: dx needs the forward's o_bar; call the forward with need_dx=True")
    with no_autocast(xs):
        labels = labels.long()
        inside = (labels != ignore_index) & (labels >= 0) & (labels < w.shape[0])  # as the forward counted them
        labels_k = torch.where(inside, labels, torch.full_like(labels, -1))
        return _backward(grad_rows, xs, xt, w, labels_k, lse_s, lse_sT, lse_tT, rxs, rxt, rw, o_bar, T, alpha, s, m1,
                         m2, m3, fallback, need_dx, need_dw, backend, operand_dtype(op_dtype))  # fmt: skip


def _backward(grad_rows, xs, xt, w, labels, lse_s, lse_sT, lse_tT, rxs, rxt, rw, o_bar, T, alpha, s, m1, m2, m3,
              fallback, need_dx, need_dw, backend, op_dtype):  # fmt: skip
    cd = rxs.dtype
    valid, _, raw_s, z_ts, z_tt, slope = _targets(xs, xt, w, labels, rxs, rxt, rw, s, m1, m2, m3, fallback, -1)
    gr = torch.where(valid, grad_rows.to(cd), torch.zeros_like(lse_s))
    dz_t = (1 - alpha) * (torch.exp(z_ts - lse_s) - 1) + alpha * T * (
        torch.exp(z_ts / T - lse_sT) - torch.exp(z_tt / T - lse_tT)
    )
    coef = gr * dz_t * slope * ((raw_s >= -1.0) & (raw_s <= 1.0))
    labels_k = torch.where(valid, labels, torch.full_like(labels, -1))
    dx = embedding_grad(xs, w, o_bar, gr, coef, labels_k, rw) if need_dx else xs.new_empty(0)
    if need_dw:
        dw = BACKENDS[backend].center_grad(xs, xt, w, labels_k, rxs, rxt, rw, lse_s, lse_sT, lse_tT, gr, coef, raw_s,
                                           s, T, alpha, op_dtype=op_dtype)  # fmt: skip
    else:
        dw = w.new_empty(0)
    return dx, dw


@torch.library.custom_op("mdkernels::margin_kd_forward", mutates_args=())
def margin_kd_forward(
    xs: torch.Tensor, xt: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, T: float, alpha: float, s: float,
    m1: float, m2: float, m3: float, fallback: bool, ignore_index: int, need_dx: bool, backend: str, op_dtype: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:  # fmt: skip
    """The fused KD forward as a torch.library op (see :func:`forward_impl`)."""
    with probe.inside(), ieee_fp32_matmul(xs):
        return forward_impl(xs, xt, w, labels, T, alpha, s, m1, m2, m3, fallback, ignore_index, need_dx, backend,
                            op_dtype)  # fmt: skip


@margin_kd_forward.register_fake
def _(xs, xt, w, labels, T, alpha, s, m1, m2, m3, fallback, ignore_index, need_dx, backend, op_dtype):
    row = xs.new_empty(xs.shape[0], dtype=compute_dtype(xs))
    o_bar = xs.new_empty(xs.shape[0] if need_dx else 0, xs.shape[1], dtype=row.dtype)
    return (row, *(torch.empty_like(row) for _ in range(5)), xs.new_empty(w.shape[0], dtype=row.dtype), o_bar)


@torch.library.custom_op("mdkernels::margin_kd_backward", mutates_args=())
def margin_kd_backward(
    grad_rows: torch.Tensor, xs: torch.Tensor, xt: torch.Tensor, w: torch.Tensor, labels: torch.Tensor,
    lse_s: torch.Tensor, lse_sT: torch.Tensor, lse_tT: torch.Tensor, rxs: torch.Tensor, rxt: torch.Tensor,
    rw: torch.Tensor, o_bar: torch.Tensor, T: float, alpha: float, s: float, m1: float, m2: float, m3: float,
    fallback: bool, ignore_index: int, need_dx: bool, need_dw: bool, backend: str, op_dtype: str,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The fused KD backward as a torch.library op (see :func:`backward_impl`)."""
    with probe.inside(), ieee_fp32_matmul(xs):
        return backward_impl(grad_rows, xs, xt, w, labels, lse_s, lse_sT, lse_tT, rxs, rxt, rw, o_bar, T, alpha, s,
                             m1, m2, m3, fallback, ignore_index, need_dx, need_dw, backend, op_dtype)  # fmt: skip


@margin_kd_backward.register_fake
def _(grad_rows, xs, xt, w, labels, lse_s, lse_sT, lse_tT, rxs, rxt, rw, o_bar, T, alpha, s, m1, m2, m3, fallback,
      ignore_index, need_dx, need_dw, backend, op_dtype):  # fmt: skip
    return (torch.empty_like(xs) if need_dx else xs.new_empty(0)), (torch.empty_like(w) if need_dw else w.new_empty(0))


def _setup_context(ctx, inputs, output):
    xs, xt, w, labels, *args = inputs
    _, lse_s, lse_sT, lse_tT, rxs, rxt, rw, o_bar = output
    ctx.save_for_backward(xs, xt, w, labels, lse_s, lse_sT, lse_tT, rxs, rxt, rw, o_bar)
    ctx.args = args[:-3]  # T .. ignore_index
    ctx.backend, ctx.op_dtype = args[-2], args[-1]
    ctx.mark_non_differentiable(*output[1:])


def _autograd_backward(ctx, grad_rows, *_unused):
    saved = ctx.saved_tensors
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    if not (need_dx or need_dw):
        return (None,) * 15
    dx, dw = margin_kd_backward(grad_rows, *saved, *ctx.args, need_dx, need_dw, ctx.backend, ctx.op_dtype)
    return (dx if need_dx else None), None, (dw if need_dw else None), *(None,) * 12


torch.library.register_autograd("mdkernels::margin_kd_forward", _autograd_backward, setup_context=_setup_context)
