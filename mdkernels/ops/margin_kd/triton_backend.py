"""Triton backend of the fused margin KD (see :mod:`mdkernels.ops.margin_kd.op` for the math).

``_margin_kd_forward_kernel``: one program per (row tile, class split, column block of D); per class tile
the student's and the teacher's cosines against the same (resident or stepped) center tile, the six
online statistics and, when the student needs a gradient, the three accumulators ``O = O * alpha + P . n(W)``
for ``P`` = ``exp(z_s - m_s)``, ``exp((z_s - m_s)/T)`` and ``exp((z_t - m_t)/T)``, each in [0, 1].
``_margin_kd_center_grad_kernel``: one program per (class tile, column block of D) over every row tile,
the tile's ``dW`` written once, as the margin CE's.
"""

from __future__ import annotations

import torch

from mdkernels._cuda_ext import guard_device
from mdkernels.ops._common.autotune import autotuned
from mdkernels.ops._common.env import HAS_TRITON, LAUNCH_OPTIONS, NEG_BIG, gpu_like, num_sms, ptr
from mdkernels.ops._common.epilogue import grad_scale
from mdkernels.ops._common.tiles import GPU_DTYPE_PATHS, shape_representatives, tile_config, triton_flags

if HAS_TRITON:
    import triton
    import triton.language as tl

    from mdkernels.ops._common.tiles import as_operand, center_grad_epilogue, cos_tile, load_tile, logits, normalised

    _NEG_BIG = tl.constexpr(NEG_BIG)

    _ANY_VALUE = ("B", "C", "classes_per_split")  # never specialised: they bound loops and masks only

    @triton.jit(do_not_specialize=_ANY_VALUE)
    def _margin_kd_forward_kernel(
        XS, XT, W, RXS, RXT, RW, Y, STATS, O_OUT, B, C, D, stride_xs, stride_xsc, stride_xt, stride_xtc, stride_w,
        stride_wc, classes_per_split, s, inv_T, NEED_O: tl.constexpr, FULL_D: tl.constexpr, BLOCK_B: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, ACC_DTYPE: tl.constexpr,
        OP_DTYPE: tl.constexpr, ROUND: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """Per (row tile, class split, D block): STATS[split, k, row] for k = m_s, l_s, l_sT, m_t, l_tT, A and
        O_OUT[split, k, row, d] for the three accumulators."""
        pid_b = tl.program_id(0)
        pid_s = tl.program_id(1)
        pid_d = tl.program_id(2)
        rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        row_mask = rows < B
        y = tl.load(Y + rows, mask=row_mask, other=-1)
        rxs = tl.load(RXS + rows, mask=row_mask, other=0.0)
        rxt = tl.load(RXT + rows, mask=row_mask, other=0.0)
        dd = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
        d_mask = dd < D
        if FULL_D:
            xs_n = normalised(load_tile(XS, rows, row_mask, dd, d_mask, stride_xs, stride_xsc), rxs, OP_DTYPE, ROUND)
            xt_n = normalised(load_tile(XT, rows, row_mask, dd, d_mask, stride_xt, stride_xtc), rxt, OP_DTYPE, ROUND)
        m_s = tl.full((BLOCK_B,), _NEG_BIG, dtype=ACC_DTYPE)
        m_t = tl.full((BLOCK_B,), _NEG_BIG, dtype=ACC_DTYPE)
        l_s = tl.zeros((BLOCK_B,), dtype=ACC_DTYPE)
        l_sT = tl.zeros((BLOCK_B,), dtype=ACC_DTYPE)
        l_tT = tl.zeros((BLOCK_B,), dtype=ACC_DTYPE)
        A = tl.zeros((BLOCK_B,), dtype=ACC_DTYPE)
        o_s = tl.zeros((BLOCK_B, BLOCK_DO), dtype=ACC_DTYPE)
        o_sT = tl.zeros((BLOCK_B, BLOCK_DO), dtype=ACC_DTYPE)
        o_tT = tl.zeros((BLOCK_B, BLOCK_DO), dtype=ACC_DTYPE)
        c_begin = pid_s * classes_per_split
        c_end = tl.minimum(c_begin + classes_per_split, C)
        for c0 in range(c_begin, c_end, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_mask = cols < c_end
            rw = tl.load(RW + cols, mask=col_mask, other=0.0)
            if FULL_D or NEED_O:
                wn = normalised(load_tile(W, cols, col_mask, dd, d_mask, stride_w, stride_wc), rw, OP_DTYPE, ROUND)
            if FULL_D:
                cs = tl.dot(xs_n, tl.trans(wn), input_precision=PRECISION, out_dtype=ACC_DTYPE)
                ct = tl.dot(xt_n, tl.trans(wn), input_precision=PRECISION, out_dtype=ACC_DTYPE)
            else:
                cs = cos_tile(XS, W, RXS, RW, rows, cols, row_mask, col_mask, D, stride_xs, stride_xsc, stride_w,
                              stride_wc, BLOCK_B, BLOCK_C, BLOCK_D, ACC_DTYPE, OP_DTYPE, ROUND, PRECISION)  # fmt: skip
                ct = cos_tile(XT, W, RXT, RW, rows, cols, row_mask, col_mask, D, stride_xt, stride_xtc, stride_w,
                              stride_wc, BLOCK_B, BLOCK_C, BLOCK_D, ACC_DTYPE, OP_DTYPE, ROUND, PRECISION)  # fmt: skip
            live = (cols[None, :] != y[:, None]) & col_mask[None, :]
            zs, keep, _ = logits(cs, live, s, 0.0, 1.0, rxs[:, None], 0.0, False, False)
            zt, _, _ = logits(ct, live, s, 0.0, 1.0, rxs[:, None], 0.0, False, False)
            ms_new = tl.maximum(m_s, tl.max(zs, 1))
            mt_new = tl.maximum(m_t, tl.max(zt, 1))
            a_s = tl.exp(m_s - ms_new)
            a_sT = tl.exp((m_s - ms_new) * inv_T)
            a_tT = tl.exp((m_t - mt_new) * inv_T)
            es = tl.exp(zs - ms_new[:, None])
            esT = tl.exp((zs - ms_new[:, None]) * inv_T)
            etT = tl.exp((zt - mt_new[:, None]) * inv_T)
            l_s = l_s * a_s + tl.sum(es, 1)
            l_sT = l_sT * a_sT + tl.sum(esT, 1)
            l_tT = l_tT * a_tT + tl.sum(etT, 1)
            A = A * a_tT + tl.sum(tl.where(live, etT * (zt - zs), 0.0), 1)
            if NEED_O:
                o_s = o_s * a_s[:, None] + tl.dot(as_operand(tl.where(keep, es, 0.0), OP_DTYPE, ROUND), wn,
                                                  input_precision=PRECISION, out_dtype=ACC_DTYPE)  # fmt: skip
                o_sT = o_sT * a_sT[:, None] + tl.dot(as_operand(tl.where(keep, esT, 0.0), OP_DTYPE, ROUND), wn,
                                                     input_precision=PRECISION, out_dtype=ACC_DTYPE)  # fmt: skip
                o_tT = o_tT * a_tT[:, None] + tl.dot(as_operand(tl.where(keep, etT, 0.0), OP_DTYPE, ROUND), wn,
                                                     input_precision=PRECISION, out_dtype=ACC_DTYPE)  # fmt: skip
            m_s = ms_new
            m_t = mt_new
        if pid_d == 0:
            base = STATS + pid_s * 6 * B + rows
            tl.store(base, m_s, mask=row_mask)
            tl.store(base + B, l_s, mask=row_mask)
            tl.store(base + 2 * B, l_sT, mask=row_mask)
            tl.store(base + 3 * B, m_t, mask=row_mask)
            tl.store(base + 4 * B, l_tT, mask=row_mask)
            tl.store(base + 5 * B, A, mask=row_mask)
        if NEED_O:
            out = O_OUT + (pid_s * 3 * B + rows[:, None]).to(tl.int64) * D + dd[None, :]
            o_mask = row_mask[:, None] & d_mask[None, :]
            tl.store(out, o_s, mask=o_mask)
            tl.store(out + B * D, o_sT, mask=o_mask)
            tl.store(out + 2 * B * D, o_tT, mask=o_mask)

    @triton.jit(do_not_specialize=_ANY_VALUE)
    def _margin_kd_center_grad_kernel(
        XS, XT, W, RXS, RXT, RW, Y, LSE_S, LSE_ST, LSE_TT, GR, COEF, GSCALE, DW, B, C, D, stride_xs, stride_xsc,
        stride_xt, stride_xtc, stride_w, stride_wc, stride_dw, stride_dwc, s, inv_T, alpha, FULL_D: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
        ACC_DTYPE: tl.constexpr, OP_DTYPE: tl.constexpr, ROUND: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """One (class tile, D block): ``dW`` of its centers through the student's logits, written once.
        Class-major, as the margin CE's."""
        pid_c = tl.program_id(0)
        pid_d = tl.program_id(1)
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        col_mask = cols < C
        dd = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
        d_mask = dd < D
        rw = tl.load(RW + cols, mask=col_mask, other=0.0)
        if FULL_D:
            wn = normalised(load_tile(W, cols, col_mask, dd, d_mask, stride_w, stride_wc), rw, OP_DTYPE, ROUND)
        gscale = tl.load(GSCALE)
        acc = tl.zeros((BLOCK_C, BLOCK_DO), dtype=ACC_DTYPE)
        dot = tl.zeros((BLOCK_C,), dtype=ACC_DTYPE)
        for r0 in range(0, B, BLOCK_B):
            rows = r0 + tl.arange(0, BLOCK_B)
            row_mask = rows < B
            gr = tl.load(GR + rows, mask=row_mask, other=0.0)
            if tl.max(tl.abs(gr), 0) != 0:
                y = tl.load(Y + rows, mask=row_mask, other=-1)
                rxs = tl.load(RXS + rows, mask=row_mask, other=0.0)
                rxt = tl.load(RXT + rows, mask=row_mask, other=0.0)
                lse_s = tl.load(LSE_S + rows, mask=row_mask, other=0.0)
                lse_sT = tl.load(LSE_ST + rows, mask=row_mask, other=0.0)
                lse_tT = tl.load(LSE_TT + rows, mask=row_mask, other=0.0)
                coef = tl.load(COEF + rows, mask=row_mask, other=0.0)
                xs_n = normalised(load_tile(XS, rows, row_mask, dd, d_mask, stride_xs, stride_xsc), rxs, OP_DTYPE,
                                  ROUND)  # fmt: skip
                if FULL_D:
                    xt_n = normalised(load_tile(XT, rows, row_mask, dd, d_mask, stride_xt, stride_xtc), rxt, OP_DTYPE,
                                      ROUND)  # fmt: skip
                    cs = tl.dot(wn, tl.trans(xs_n), input_precision=PRECISION, out_dtype=ACC_DTYPE)
                    ct = tl.dot(wn, tl.trans(xt_n), input_precision=PRECISION, out_dtype=ACC_DTYPE)
                else:
                    cs = cos_tile(W, XS, RW, RXS, cols, rows, col_mask, row_mask, D, stride_w, stride_wc, stride_xs,
                                  stride_xsc, BLOCK_C, BLOCK_B, BLOCK_D, ACC_DTYPE, OP_DTYPE, ROUND,
                                  PRECISION)  # fmt: skip
                    ct = cos_tile(W, XT, RW, RXT, cols, rows, col_mask, row_mask, D, stride_w, stride_wc, stride_xt,
                                  stride_xtc, BLOCK_C, BLOCK_B, BLOCK_D, ACC_DTYPE, OP_DTYPE, ROUND,
                                  PRECISION)  # fmt: skip
                target = (cols[:, None] == y[None, :]) & col_mask[:, None]
                live = ~target & col_mask[:, None] & row_mask[None, :]
                zs, keep, _ = logits(cs, live, s, 0.0, 1.0, rxs[None, :], 0.0, False, False)
                zt, _, _ = logits(ct, live, s, 0.0, 1.0, rxs[None, :], 0.0, False, False)
                p_s = tl.exp(zs - lse_s[None, :])
                q_s = tl.exp(zs * inv_T - lse_sT[None, :])
                q_t = tl.exp(zt * inv_T - lse_tT[None, :])
                dz = (1.0 - alpha) * p_s + (alpha / inv_T) * (q_s - q_t)
                g = tl.where(keep, dz * (s * gr)[None, :], 0.0)
                g = tl.where(target, coef[None, :], g)
                dot += tl.sum(g * cs, 1)
                acc += tl.dot(as_operand(g / gscale, OP_DTYPE, ROUND), xs_n, input_precision=PRECISION,
                              out_dtype=ACC_DTYPE)  # fmt: skip
        wt = load_tile(W, cols, col_mask, dd, d_mask, stride_w, stride_wc)  # reloaded: not held over the loop
        center_grad_epilogue(acc, dot, gscale, wt, rw, cols, col_mask, dd, d_mask, DW, stride_dw, stride_dwc)


@guard_device
def forward(xs, xt, w, labels, rxs, rxt, rw, s, T, need_o, op_dtype=None):
    """``(stats, o3)`` as :func:`mdkernels.ops.margin_kd.torch_backend.forward`, split-C partials merged.
    ``op_dtype``: the dots' operand dtype (autocast's, for fp32 inputs). Any strides."""
    B, D = xs.shape
    C = w.shape[0]
    cd = rxs.dtype
    flags = triton_flags(xs.dtype, xs.is_cuda, op_dtype)

    def launch(cfg):
        row_tiles, class_tiles = triton.cdiv(B, cfg["BLOCK_B"]), triton.cdiv(C, cfg["BLOCK_C"])
        splits = max(1, min(class_tiles, (4 * num_sms(xs.device)) // row_tiles)) if gpu_like(xs) else 1
        per_split = triton.cdiv(class_tiles, splits) * cfg["BLOCK_C"]
        splits = triton.cdiv(C, per_split)
        d_splits = triton.cdiv(D, cfg["BLOCK_DO"]) if need_o else 1
        stats = torch.empty(splits, 6, B, dtype=cd, device=xs.device)
        o = torch.empty(splits, 3, B, D, dtype=cd, device=xs.device) if need_o else stats
        _margin_kd_forward_kernel[(row_tiles, splits, d_splits)](
            xs, xt, w, rxs, rxt, rw, labels, stats, o, B, C, D, xs.stride(0), xs.stride(1), xt.stride(0),
            xt.stride(1), w.stride(0), w.stride(1), per_split, float(s), 1.0 / float(T), NEED_O=need_o, **flags,
            **cfg, **LAUNCH_OPTIONS,
        )  # fmt: skip
        return stats, o

    stats, o = launch(autotuned("kd_forward", xs, B, C, D, launch, op_dtype=op_dtype))
    m_s, l_s, l_sT, m_t, l_tT, A = stats.unbind(1)
    ms, mt = m_s.max(0).values, m_t.max(0).values
    fs, fsT, ft = torch.exp(m_s - ms), torch.exp((m_s - ms) / T), torch.exp((m_t - mt) / T)
    merged = (ms, (l_s * fs).sum(0), (l_sT * fsT).sum(0), mt, (l_tT * ft).sum(0), (A * ft).sum(0))
    if not need_o:
        return merged, None
    o3 = torch.einsum("skbd,skb->kbd", o, torch.stack([fs, fsT, ft], 1))
    return merged, o3


@guard_device
def center_grad(xs, xt, w, labels, rxs, rxt, rw, lse_s, lse_sT, lse_tT, gr, coef, raw_t, s, T, alpha, op_dtype=None):
    """``dL/dW`` (C, D) in the centers' dtype and layout, as
    :func:`mdkernels.ops.margin_kd.torch_backend.center_grad`."""
    B, D = xs.shape
    C = w.shape[0]
    dw = torch.empty_like(w)
    gscale = grad_scale(gr, coef, s).to(rxs.dtype)
    flags = triton_flags(xs.dtype, xs.is_cuda, op_dtype)

    def launch(cfg):
        grid = (triton.cdiv(C, cfg["BLOCK_C"]), triton.cdiv(D, cfg["BLOCK_DO"]))
        _margin_kd_center_grad_kernel[grid](
            xs, xt, w, rxs, rxt, rw, labels, lse_s, lse_sT, lse_tT, gr, coef, gscale, dw, B, C, D, xs.stride(0),
            xs.stride(1), xt.stride(0), xt.stride(1), w.stride(0), w.stride(1), dw.stride(0), dw.stride(1), float(s),
            1.0 / float(T), float(alpha), **flags, **cfg, **LAUNCH_OPTIONS,
        )  # fmt: skip

    if C and B:
        launch(autotuned("kd_center_grad", xs, B, C, D, launch, op_dtype=op_dtype))
    else:
        dw.zero_()
    return dw


def launch_specs(arch: int) -> list:
    """Every kernel a GPU launch on ``sm_<arch>`` can compile, one per distinct tile, as
    :func:`mdkernels.ops.margin_ce.triton_backend.launch_specs` (the forward with O: the most registers)."""
    specs = []
    for dtype, op in GPU_DTYPE_PATHS:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        common = {"XS": ptr(dtype), "XT": ptr(dtype), "W": ptr(dtype), "RXS": ptr(acc), "RXT": ptr(acc),
                  "RW": ptr(acc), "Y": "*i64", "B": "i32", "C": "i32", "D": "i32", "stride_xs": "i32",
                  "stride_xt": "i32", "stride_w": "i32", "s": "fp32", "inv_T": "fp32"}  # fmt: skip
        fwd = {**common, "STATS": ptr(acc), "O_OUT": ptr(acc), "classes_per_split": "i32"}
        bwd = {**common, "LSE_S": ptr(acc), "LSE_ST": ptr(acc), "LSE_TT": ptr(acc), "GR": ptr(acc), "COEF": ptr(acc),
               "GSCALE": ptr(acc), "DW": ptr(dtype), "stride_dw": "i32", "alpha": "fp32"}  # fmt: skip
        path = str(dtype).removeprefix("torch.") + (f" amp-{str(op).removeprefix('torch.')}" if op else "")
        unit = {"stride_xsc": 1, "stride_xtc": 1, "stride_wc": 1, **triton_flags(dtype, True, op)}
        for B, D, kind in shape_representatives():
            for kernel, fn, sig, extra in (("kd_forward", _margin_kd_forward_kernel, fwd, {"NEED_O": True}),
                                           ("kd_center_grad", _margin_kd_center_grad_kernel, bwd, {"stride_dwc": 1})):  # fmt: skip
                cfg = tile_config(kernel, dtype, B, D, arch=arch, op_dtype=op)
                opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
                ints = {"D": D, "stride_xs": D, "stride_xt": D, "stride_w": D, "stride_dw": D}  # B, C: never specialised
                specs.append((f"margin_{kernel} {path} B={B} D={D} {kind}", fn, sig, {**unit, **extra, **cfg}, opts,
                              {k: v for k, v in ints.items() if k in sig}))  # fmt: skip
    return specs
