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

from mdkernels._cuda_ext import guard_device
from mdkernels._validate import check_label_values
from mdkernels.ops import margin_ce as mce
from mdkernels.ops.l2norm import normalize_backward, row_rnorm
from mdkernels.ops.margin import margin_target_and_slope

if mce.HAS_TRITON:
    import triton
    import triton.language as tl

    _NEG_BIG = tl.constexpr(mce.NEG_BIG)

    @triton.jit
    def _margin_kd_forward_kernel(
        XS, XT, W, RXS, RXT, RW, Y, STATS,
        B, C, D, stride_xs, stride_xt, stride_w, classes_per_split, s, inv_T,
        BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
        ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """Per (row tile, class split): STATS[split, k, row] for k = m_s, l_s, l_sT, m_t, l_tT, A."""
        pid_b = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        row_mask = rows < B
        y = tl.load(Y + rows, mask=row_mask, other=-1)
        m_s = tl.full((BLOCK_B,), _NEG_BIG, dtype=ACC_DTYPE)
        m_t = tl.full((BLOCK_B,), _NEG_BIG, dtype=ACC_DTYPE)
        l_s = tl.zeros((BLOCK_B,), dtype=ACC_DTYPE)
        l_sT = tl.zeros((BLOCK_B,), dtype=ACC_DTYPE)
        l_tT = tl.zeros((BLOCK_B,), dtype=ACC_DTYPE)
        A = tl.zeros((BLOCK_B,), dtype=ACC_DTYPE)
        c_begin = pid_s * classes_per_split
        c_end = tl.minimum(c_begin + classes_per_split, C)
        for c0 in range(c_begin, c_end, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_mask = cols < c_end
            cs = mce._cos_tile(XS, W, RXS, RW, rows, cols, row_mask, col_mask, D, stride_xs, stride_w,
                               BLOCK_B, BLOCK_C, BLOCK_D, ACC_DTYPE, UPCAST, PRECISION)  # fmt: skip
            ct = mce._cos_tile(XT, W, RXT, RW, rows, cols, row_mask, col_mask, D, stride_xt, stride_w,
                               BLOCK_B, BLOCK_C, BLOCK_D, ACC_DTYPE, UPCAST, PRECISION)  # fmt: skip
            live = (cols[None, :] != y[:, None]) & col_mask[None, :]
            zs = tl.minimum(tl.maximum(cs, -1.0), 1.0) * s
            zt = tl.minimum(tl.maximum(ct, -1.0), 1.0) * s
            ms_new = tl.maximum(m_s, tl.max(tl.where(live, zs, float("-inf")), 1))
            mt_new = tl.maximum(m_t, tl.max(tl.where(live, zt, float("-inf")), 1))
            es = tl.where(live, tl.exp(zs - ms_new[:, None]), 0.0)
            esT = tl.where(live, tl.exp((zs - ms_new[:, None]) * inv_T), 0.0)
            etT = tl.where(live, tl.exp((zt - mt_new[:, None]) * inv_T), 0.0)
            l_s = l_s * tl.exp(m_s - ms_new) + tl.sum(es, 1)
            l_sT = l_sT * tl.exp((m_s - ms_new) * inv_T) + tl.sum(esT, 1)
            rescale_t = tl.exp((m_t - mt_new) * inv_T)
            l_tT = l_tT * rescale_t + tl.sum(etT, 1)
            A = A * rescale_t + tl.sum(etT * (zt - zs), 1)
            m_s = ms_new
            m_t = mt_new
        base = STATS + pid_s * 6 * B + rows
        tl.store(base, m_s, mask=row_mask)
        tl.store(base + B, l_s, mask=row_mask)
        tl.store(base + 2 * B, l_sT, mask=row_mask)
        tl.store(base + 3 * B, m_t, mask=row_mask)
        tl.store(base + 4 * B, l_tT, mask=row_mask)
        tl.store(base + 5 * B, A, mask=row_mask)

    @triton.jit
    def _margin_kd_backward_kernel(
        XS, XT, W, RXS, RXT, RW, Y, LSE_S, LSE_ST, LSE_TT, GR, GSCALE, DXH, DWH,
        B, C, D, stride_xs, stride_xt, stride_w, s, inv_T, alpha,
        COMPUTE_DW: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
        ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        pid_c = tl.program_id(0)  # class tiles on axis 0: CUDA caps grid axis 1 at 65535
        pid_b = tl.program_id(1)
        rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        row_mask = rows < B
        col_mask = cols < C
        gr = tl.load(GR + rows, mask=row_mask, other=0.0)
        if tl.max(tl.abs(gr), 0) != 0:
            y = tl.load(Y + rows, mask=row_mask, other=-1)
            lse_s = tl.load(LSE_S + rows, mask=row_mask, other=0.0)
            lse_sT = tl.load(LSE_ST + rows, mask=row_mask, other=0.0)
            lse_tT = tl.load(LSE_TT + rows, mask=row_mask, other=0.0)
            cs = mce._cos_tile(XS, W, RXS, RW, rows, cols, row_mask, col_mask, D, stride_xs, stride_w,
                               BLOCK_B, BLOCK_C, BLOCK_D, ACC_DTYPE, UPCAST, PRECISION)  # fmt: skip
            ct = mce._cos_tile(XT, W, RXT, RW, rows, cols, row_mask, col_mask, D, stride_xt, stride_w,
                               BLOCK_B, BLOCK_C, BLOCK_D, ACC_DTYPE, UPCAST, PRECISION)  # fmt: skip
            keep = (cs >= -1.0) & (cs <= 1.0) & (cols[None, :] != y[:, None]) & col_mask[None, :] & row_mask[:, None]
            zs = tl.minimum(tl.maximum(cs, -1.0), 1.0) * s
            zt = tl.minimum(tl.maximum(ct, -1.0), 1.0) * s
            p_s = tl.exp(zs - lse_s[:, None])
            q_s = tl.exp(zs * inv_T - lse_sT[:, None])
            q_t = tl.exp(zt * inv_T - lse_tT[:, None])
            dz = (1.0 - alpha) * p_s + (alpha / inv_T) * (q_s - q_t)
            gscale = tl.load(GSCALE)
            g = tl.where(keep, dz * (s * (gr / gscale)[:, None]), 0.0)
            mce._scatter_grads(g, XS, W, RXS, RW, DXH, DWH, rows, cols, row_mask, col_mask, D, stride_xs, stride_w,
                               gscale, COMPUTE_DW, BLOCK_D, ACC_DTYPE, UPCAST, PRECISION)  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# statistics over non-target classes: Triton and chunked torch
# ----------------------------------------------------------------------------------------------------
@guard_device
def _stats_triton(xs, xt, w, labels, rxs, rxt, rw, s, T):
    B, D = xs.shape
    C = w.shape[0]
    cfg = mce._triton_config(xs.dtype, B, D)
    row_tiles = triton.cdiv(B, cfg["BLOCK_B"])
    class_tiles = triton.cdiv(C, cfg["BLOCK_C"])
    splits = max(1, min(class_tiles, (4 * mce._num_sms(xs.device)) // row_tiles)) if xs.is_cuda else 1
    per_split = triton.cdiv(class_tiles, splits) * cfg["BLOCK_C"]
    splits = triton.cdiv(C, per_split)
    stats = torch.empty(splits, 6, B, dtype=rxs.dtype, device=xs.device)
    _margin_kd_forward_kernel[(row_tiles, splits)](
        xs,
        xt,
        w,
        rxs,
        rxt,
        rw,
        labels,
        stats,
        B,
        C,
        D,
        xs.stride(0),
        xt.stride(0),
        w.stride(0),
        per_split,
        float(s),
        1.0 / float(T),
        **mce._triton_flags(xs.dtype, xs.is_cuda),
        **cfg,
    )
    return _merge_splits(stats, T)


def _merge_splits(stats, T):
    """Combine per-split partials (splits, 6, B) into one set of (6, B) statistics."""
    m_s, l_s, l_sT, m_t, l_tT, A = stats.unbind(1)
    ms, mt = m_s.max(0).values, m_t.max(0).values
    fs, fsT, ft = torch.exp(m_s - ms), torch.exp((m_s - ms) / T), torch.exp((m_t - mt) / T)
    return ms, (l_s * fs).sum(0), (l_sT * fsT).sum(0), mt, (l_tT * ft).sum(0), (A * ft).sum(0)


def _stats_torch(xs, xt, w, labels, rxs, rxt, rw, s, T):
    B, C = xs.shape[0], w.shape[0]
    cd = rxs.dtype
    xsh, xth = xs.to(cd) * rxs[:, None], xt.to(cd) * rxt[:, None]
    m_s = torch.full((B,), mce.NEG_BIG, dtype=cd, device=xs.device)
    m_t = m_s.clone()
    l_s, l_sT, l_tT, A = (torch.zeros(B, dtype=cd, device=xs.device) for _ in range(4))
    step = mce._chunk_size(2 * B, C)
    for c0 in range(0, C, step):
        c1 = min(C, c0 + step)
        zs = mce._chunk_cos(xsh, w, rw, c0, c1).clamp_(-1.0, 1.0).mul_(s)
        zt = mce._chunk_cos(xth, w, rw, c0, c1).clamp_(-1.0, 1.0).mul_(s)
        rows, cols = mce._target_mask(labels, c0, c1)
        zs[rows, cols] = -math.inf
        zt[rows, cols] = -math.inf
        ms_new = torch.maximum(m_s, zs.max(1).values)
        mt_new = torch.maximum(m_t, zt.max(1).values)
        es = zs - ms_new[:, None]
        l_s = l_s * torch.exp(m_s - ms_new) + es.exp().sum(1)
        l_sT = l_sT * torch.exp((m_s - ms_new) / T) + es.div_(T).exp_().sum(1)
        et = (zt - mt_new[:, None]).div_(T).exp_()
        f = torch.exp((m_t - mt_new) / T)
        l_tT = l_tT * f + et.sum(1)
        zt.sub_(zs).nan_to_num_(0.0, 0.0, 0.0)  # masked targets: -inf - -inf; their weight et is 0
        A = A * f + (et * zt).sum(1)
        m_s, m_t = ms_new, mt_new
    return m_s, l_s, l_sT, m_t, l_tT, A


def _grad_hat_torch(xs, xt, w, labels, rxs, rxt, rw, lse_s, lse_sT, lse_tT, gr, s, T, alpha, need_dw, target_dw):
    B, C = xs.shape[0], w.shape[0]
    cd = rxs.dtype
    xsh, xth = xs.to(cd) * rxs[:, None], xt.to(cd) * rxt[:, None]
    dxh = torch.zeros_like(xsh)
    dw = torch.empty_like(w) if need_dw else None
    step = mce._chunk_size(2 * B, C)
    for c0 in range(0, C, step):
        c1 = min(C, c0 + step)
        cs = mce._chunk_cos(xsh, w, rw, c0, c1)
        keep = (cs >= -1.0) & (cs <= 1.0)
        zs = cs.clamp_(-1.0, 1.0).mul_(s)
        zt = mce._chunk_cos(xth, w, rw, c0, c1).clamp_(-1.0, 1.0).mul_(s)
        rows, cols = mce._target_mask(labels, c0, c1)
        keep[rows, cols] = False
        # masked entries to -inf before the exps: the un-margined target logits may overflow
        zs.masked_fill_(~keep, -math.inf)
        zt.masked_fill_(~keep, -math.inf)
        q_t = zt.div_(T).sub_(lse_tT[:, None]).exp_()
        q_s = (zs / T).sub_(lse_sT[:, None]).exp_()
        g = zs.sub_(lse_s[:, None]).exp_().mul_(1.0 - alpha).add_(q_s.sub_(q_t), alpha=alpha * T)
        g.mul_(gr[:, None] * s)
        dxh.addmm_(g * rw[None, c0:c1], w[c0:c1].to(cd))
        if need_dw:
            dwh = g.T @ xsh
            dwh.index_add_(0, cols, target_dw(rows))
            normalize_backward(w[c0:c1], dwh, out=dw[c0:c1])
    return dxh, dw


# ----------------------------------------------------------------------------------------------------
# op pair + autograd
# ----------------------------------------------------------------------------------------------------
def _targets(xs, xt, w, labels, rxs, rxt, rw, s, m1, m2, m3, fallback, ignore_index):
    valid, safe, raw_s = mce._target_cos(xs, w, labels, rxs, rw, ignore_index)
    _, _, raw_t = mce._target_cos(xt, w, labels, rxt, rw, ignore_index)
    m2v = torch.full_like(raw_s, m2)
    kw = dict(s=s, m1=m1, m3=m3, fallback=fallback, grad="exact")
    z_ts, slope = margin_target_and_slope(raw_s.clamp(-1.0, 1.0), m2v, **kw)
    z_tt, _ = margin_target_and_slope(raw_t.clamp(-1.0, 1.0), m2v, **kw)
    return valid, safe, raw_s, z_ts, z_tt, slope


def forward_impl(xs, xt, w, labels, T, alpha, s, m1, m2, m3, fallback, ignore_index, backend):
    """Returns ``(loss_rows, lse_s, lse_sT, lse_tT, rxs, rxt, rw)``, all ``(B,)`` but ``rw: (C,)``."""
    mce._check_backend_device(xs, backend)
    check_label_values(labels, w.shape[0], ignore_index)
    xs, xt, w, labels = xs.contiguous(), xt.contiguous(), w.contiguous(), labels.long().contiguous()
    rxs, rxt, rw = row_rnorm(xs), row_rnorm(xt), row_rnorm(w)
    valid, _, _, z_ts, z_tt, _ = _targets(xs, xt, w, labels, rxs, rxt, rw, s, m1, m2, m3, fallback, ignore_index)
    labels_k = torch.where(valid, labels, torch.full_like(labels, -1))
    impl = _stats_triton if backend == "triton" else _stats_torch
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


@guard_device
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
        B, D = xs.shape
        C = w.shape[0]
        cfg = mce._triton_config(xs.dtype, B, D)
        dxh = torch.zeros(B, D, dtype=cd, device=xs.device)
        dwh = torch.zeros(C, D, dtype=cd, device=xs.device) if need_dw else dxh
        grid = (triton.cdiv(C, cfg["BLOCK_C"]), triton.cdiv(B, cfg["BLOCK_B"]))
        _margin_kd_backward_kernel[grid](
            xs,
            xt,
            w,
            rxs,
            rxt,
            rw,
            labels_k,
            lse_s,
            lse_sT,
            lse_tT,
            gr,
            mce._grad_scale(gr).to(cd),
            dxh,
            dwh,
            B,
            C,
            D,
            xs.stride(0),
            xt.stride(0),
            w.stride(0),
            float(s),
            1.0 / float(T),
            float(alpha),
            COMPUTE_DW=need_dw,
            **mce._triton_flags(xs.dtype, xs.is_cuda),
            **cfg,
        )
        dw = None
        if need_dw:
            dw = mce.finish_center_grad(w, dwh, safe, coef, xsh)
    else:
        dxh, dw = _grad_hat_torch(
            xs,
            xt,
            w,
            labels_k,
            rxs,
            rxt,
            rw,
            lse_s,
            lse_sT,
            lse_tT,
            gr,
            s,
            T,
            alpha,
            need_dw,
            target_dw=lambda rows: coef[rows, None] * xsh[rows],
        )
    return mce.finish_embedding_grad(xs, dxh, w, safe, rw, coef), (dw if need_dw else w.new_empty(0))


@torch.library.custom_op("mdkernels::margin_kd_forward", mutates_args=())
def margin_kd_forward(
    xs: torch.Tensor, xt: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, T: float, alpha: float, s: float,
    m1: float, m2: float, m3: float, fallback: bool, ignore_index: int, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The fused KD forward as a torch.library op (see :func:`forward_impl`)."""
    return forward_impl(xs, xt, w, labels, T, alpha, s, m1, m2, m3, fallback, ignore_index, backend)


@margin_kd_forward.register_fake
def _(xs, xt, w, labels, T, alpha, s, m1, m2, m3, fallback, ignore_index, backend):
    row = xs.new_empty(xs.shape[0], dtype=mce.compute_dtype(xs))
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


def compile_specs(dtype: torch.dtype, B: int = 1024, D: int = 512) -> list:
    """The kernels as the GPU launcher compiles them (see :mod:`mdkernels.ops.gpu_compile`)."""
    from mdkernels.ops.gpu_compile import ptr

    cfg = mce._triton_config(dtype, B, D)
    opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    flags = mce._triton_flags(dtype, on_cuda=True)
    common = {"XS": ptr(dtype), "XT": ptr(dtype), "W": ptr(dtype), "RXS": ptr(acc), "RXT": ptr(acc), "RW": ptr(acc),
              "Y": "*i64", "B": "i32", "C": "i32", "D": "i32", "stride_xs": "i32", "stride_xt": "i32",
              "stride_w": "i32", "s": "fp32", "inv_T": "fp32"}  # fmt: skip
    fwd = {**common, "STATS": ptr(acc), "classes_per_split": "i32"}
    bwd = {**common, "LSE_S": ptr(acc), "LSE_ST": ptr(acc), "LSE_TT": ptr(acc), "GR": ptr(acc), "GSCALE": ptr(acc),
           "DXH": ptr(acc), "DWH": ptr(acc), "alpha": "fp32"}  # fmt: skip
    specs = [("margin_kd_forward", _margin_kd_forward_kernel, fwd, {**cfg, **flags}, opts)]
    for dw in (False, True):
        specs.append((f"margin_kd_backward dw={dw}", _margin_kd_backward_kernel, bwd,
                      {"COMPUTE_DW": dw, **cfg, **flags}, opts))  # fmt: skip
    return specs
