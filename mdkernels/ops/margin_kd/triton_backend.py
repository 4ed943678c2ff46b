"""Triton backend of the fused margin KD: the six online statistics (split-C) and the backward tiles."""

from __future__ import annotations

import torch

from mdkernels._cuda_ext import guard_device
from mdkernels.ops._common.env import HAS_TRITON, NEG_BIG, num_sms, ptr
from mdkernels.ops._common.epilogue import grad_scale
from mdkernels.ops._common.tiles import margin_tile_config, triton_flags

if HAS_TRITON:
    import triton
    import triton.language as tl

    from mdkernels.ops._common.tiles import cos_tile, scatter_grads

    _NEG_BIG = tl.constexpr(NEG_BIG)

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
            cs = cos_tile(XS, W, RXS, RW, rows, cols, row_mask, col_mask, D, stride_xs, stride_w,
                               BLOCK_B, BLOCK_C, BLOCK_D, ACC_DTYPE, UPCAST, PRECISION)  # fmt: skip
            ct = cos_tile(XT, W, RXT, RW, rows, cols, row_mask, col_mask, D, stride_xt, stride_w,
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
            cs = cos_tile(XS, W, RXS, RW, rows, cols, row_mask, col_mask, D, stride_xs, stride_w,
                               BLOCK_B, BLOCK_C, BLOCK_D, ACC_DTYPE, UPCAST, PRECISION)  # fmt: skip
            ct = cos_tile(XT, W, RXT, RW, rows, cols, row_mask, col_mask, D, stride_xt, stride_w,
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
            scatter_grads(g, XS, W, RXS, RW, DXH, DWH, rows, cols, row_mask, col_mask, D, stride_xs, stride_w,
                               gscale, COMPUTE_DW, BLOCK_D, ACC_DTYPE, UPCAST, PRECISION)  # fmt: skip



@guard_device
def stats(xs, xt, w, labels, rxs, rxt, rw, s, T):
    B, D = xs.shape
    C = w.shape[0]
    cfg = margin_tile_config(xs.dtype, B, D)
    row_tiles = triton.cdiv(B, cfg["BLOCK_B"])
    class_tiles = triton.cdiv(C, cfg["BLOCK_C"])
    splits = max(1, min(class_tiles, (4 * num_sms(xs.device)) // row_tiles)) if xs.is_cuda else 1
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
        **triton_flags(xs.dtype, xs.is_cuda),
        **cfg,
    )
    return _merge_splits(stats, T)


def _merge_splits(stats, T):
    """Combine per-split partials (splits, 6, B) into one set of (6, B) statistics."""
    m_s, l_s, l_sT, m_t, l_tT, A = stats.unbind(1)
    ms, mt = m_s.max(0).values, m_t.max(0).values
    fs, fsT, ft = torch.exp(m_s - ms), torch.exp((m_s - ms) / T), torch.exp((m_t - mt) / T)
    return ms, (l_s * fs).sum(0), (l_sT * fsT).sum(0), mt, (l_tT * ft).sum(0), (A * ft).sum(0)




@guard_device
def grad_hat(xs, xt, w, labels, rxs, rxt, rw, lse_s, lse_sT, lse_tT, gr, s, T, alpha, need_dw):
    """Raw ``dx^`` (B, D) and, when ``need_dw``, ``dW^`` (C, D) in fp32 buffers (no target term)."""
    B, D = xs.shape
    C = w.shape[0]
    cd = rxs.dtype
    cfg = margin_tile_config(xs.dtype, B, D)
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
        labels,
        lse_s,
        lse_sT,
        lse_tT,
        gr,
        grad_scale(gr).to(cd),
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
        **triton_flags(xs.dtype, xs.is_cuda),
        **cfg,
    )
    return dxh, (dwh if need_dw else None)


def compile_specs(dtype: torch.dtype, B: int = 1024, D: int = 512) -> list:
    """The kernels as the GPU launcher compiles them (see :mod:`mdkernels.tools.gpu_compile`)."""
    cfg = margin_tile_config(dtype, B, D)
    opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    flags = triton_flags(dtype, on_cuda=True)
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
