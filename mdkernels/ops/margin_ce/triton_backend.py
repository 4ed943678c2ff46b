"""Triton backend of the fused margin CE (see :mod:`mdkernels.ops.margin_ce.op` for the design).

``_margin_ce_forward_kernel``: one program per (row tile, class split, column block of D). Per class tile:
the cosines, the online max / sum-exp of the non-target logits and, when the embeddings need a gradient,
``O = O * alpha + P . n(W)`` with ``P = exp(z - m)`` in [0, 1] cast to the input dtype for the dot. With
``FULL_D`` the row tile and one center tile over all of D are the only loads, and the normalised center
tile serves both dots; above that, D is split over the grid's third axis and each program builds the
cosines over all of D in steps.

``_margin_ce_center_grad_kernel``: one program per (class tile, column block of D), looping over every
row tile: cosines again, ``G = dL/dc`` (target term included), ``acc += G^T . n(x)`` and ``dot += sum_i G c``,
then :func:`mdkernels.ops._common.tiles.center_grad_epilogue` writes the tile's ``dW`` once. No atomics.
"""

from __future__ import annotations

import torch

from mdkernels._cuda_ext import guard_device
from mdkernels._spec import compute_dtype
from mdkernels.ops._common.env import HAS_TRITON, NEG_BIG, num_sms, ptr
from mdkernels.ops._common.epilogue import grad_scale
from mdkernels.ops._common.tiles import autotuned, tile_config, triton_flags

if HAS_TRITON:
    import triton
    import triton.language as tl

    from mdkernels.ops._common.tiles import center_grad_epilogue, cos_tile, load_tile, logits, normalised

    _NEG_BIG = tl.constexpr(NEG_BIG)  # globals read inside @triton.jit must be constexpr

    @triton.jit
    def _margin_ce_forward_kernel(
        X, W, RX, RW, Y, M_OUT, L_OUT, O_OUT, B, C, D, stride_x, stride_w, classes_per_split, s, tau,
        HAS_FILTER: tl.constexpr, NEED_O: tl.constexpr, FULL_D: tl.constexpr, BLOCK_B: tl.constexpr,
        BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, ACC_DTYPE: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """Per (row tile, class split, D block): running max ``M``, sum-exp ``L`` and ``O`` (unnormalised,
        relative to ``M``) of the non-target logits of the split."""
        pid_b = tl.program_id(0)
        pid_s = tl.program_id(1)
        pid_d = tl.program_id(2)
        rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        row_mask = rows < B
        y = tl.load(Y + rows, mask=row_mask, other=-1)
        rx = tl.load(RX + rows, mask=row_mask, other=0.0)
        dd = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
        d_mask = dd < D
        op_dtype = ACC_DTYPE if UPCAST else X.dtype.element_ty  # the dots' operand dtype
        if FULL_D:  # the row tile, normalised once: both kernels build FULL_D cosines from n(x) . n(W)^T
            xn = normalised(load_tile(X, rows, row_mask, dd, d_mask, stride_x), rx, op_dtype)
        m = tl.full((BLOCK_B,), _NEG_BIG, dtype=ACC_DTYPE)
        l = tl.zeros((BLOCK_B,), dtype=ACC_DTYPE)
        o = tl.zeros((BLOCK_B, BLOCK_DO), dtype=ACC_DTYPE)
        c_begin = pid_s * classes_per_split
        c_end = tl.minimum(c_begin + classes_per_split, C)
        for c0 in range(c_begin, c_end, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_mask = cols < c_end
            rw = tl.load(RW + cols, mask=col_mask, other=0.0)
            if FULL_D:
                wn = normalised(load_tile(W, cols, col_mask, dd, d_mask, stride_w), rw, op_dtype)
                raw = tl.dot(xn, tl.trans(wn), input_precision=PRECISION, out_dtype=ACC_DTYPE)
            else:
                raw = cos_tile(X, W, RX, RW, rows, cols, row_mask, col_mask, D, stride_x, stride_w, BLOCK_B,
                               BLOCK_C, BLOCK_D, ACC_DTYPE, UPCAST, PRECISION)  # fmt: skip
            live = (cols[None, :] != y[:, None]) & col_mask[None, :]
            z, keep = logits(raw, live, s, tau, HAS_FILTER)
            m_new = tl.maximum(m, tl.max(z, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(z - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            if NEED_O:
                if not FULL_D:
                    wn = normalised(load_tile(W, cols, col_mask, dd, d_mask, stride_w), rw, op_dtype)
                p = tl.where(keep, p, 0.0).to(op_dtype)  # in [0, 1]: safe in fp16/bf16 after the max is out
                o = o * alpha[:, None] + tl.dot(p, wn, input_precision=PRECISION, out_dtype=ACC_DTYPE)
            m = m_new
        if pid_d == 0:
            tl.store(M_OUT + pid_s * B + rows, m, mask=row_mask)
            tl.store(L_OUT + pid_s * B + rows, l, mask=row_mask)
        if NEED_O:
            base = O_OUT + (pid_s * B + rows[:, None]).to(tl.int64) * D + dd[None, :]
            tl.store(base, o, mask=row_mask[:, None] & d_mask[None, :])

    @triton.jit
    def _margin_ce_center_grad_kernel(
        X, W, RX, RW, Y, LSE, GR, COEF, GSCALE, DW, B, C, D, stride_x, stride_w, stride_dw, s, tau,
        HAS_FILTER: tl.constexpr, FULL_D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        """One (class tile, D block): ``dW`` of its centers from every row, written once."""
        pid_c = tl.program_id(0)
        pid_d = tl.program_id(1)
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        col_mask = cols < C
        dd = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
        d_mask = dd < D
        op_dtype = ACC_DTYPE if UPCAST else X.dtype.element_ty
        rw = tl.load(RW + cols, mask=col_mask, other=0.0)
        if FULL_D:
            wn = normalised(load_tile(W, cols, col_mask, dd, d_mask, stride_w), rw, op_dtype)
        gscale = tl.load(GSCALE)
        acc = tl.zeros((BLOCK_C, BLOCK_DO), dtype=ACC_DTYPE)
        dot = tl.zeros((BLOCK_C,), dtype=ACC_DTYPE)
        for r0 in range(0, B, BLOCK_B):
            rows = r0 + tl.arange(0, BLOCK_B)
            row_mask = rows < B
            gr = tl.load(GR + rows, mask=row_mask, other=0.0)
            if tl.max(tl.abs(gr), 0) != 0:  # row tiles of ignored rows (zero weight) contribute nothing
                y = tl.load(Y + rows, mask=row_mask, other=-1)
                lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
                coef = tl.load(COEF + rows, mask=row_mask, other=0.0)
                rx = tl.load(RX + rows, mask=row_mask, other=0.0)
                xn = normalised(load_tile(X, rows, row_mask, dd, d_mask, stride_x), rx, op_dtype)
                if FULL_D:
                    raw = tl.dot(xn, tl.trans(wn), input_precision=PRECISION, out_dtype=ACC_DTYPE)
                else:
                    raw = cos_tile(X, W, RX, RW, rows, cols, row_mask, col_mask, D, stride_x, stride_w, BLOCK_B,
                                   BLOCK_C, BLOCK_D, ACC_DTYPE, UPCAST, PRECISION)  # fmt: skip
                target = (cols[None, :] == y[:, None]) & col_mask[None, :]
                live = ~target & col_mask[None, :] & row_mask[:, None]
                z, keep = logits(raw, live, s, tau, HAS_FILTER)
                # masked entries are exp(-inf) = 0 before any product: the un-margined target may overflow
                g = tl.where(keep, tl.exp(z - lse[:, None]) * (s * gr)[:, None], 0.0)
                g = tl.where(target, coef[:, None], g)
                dot += tl.sum(g * raw, 0)
                acc += tl.dot(tl.trans((g / gscale).to(op_dtype)), xn, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        wt = load_tile(W, cols, col_mask, dd, d_mask, stride_w)  # reloaded: not held in registers over the loop
        center_grad_epilogue(acc, dot, gscale, wt, rw, cols, col_mask, dd, d_mask, DW, stride_dw)


def _splits(x: torch.Tensor, row_tiles: int, class_tiles: int) -> int:
    """Class splits: enough programs to fill the GPU when the batch alone gives few row tiles."""
    return max(1, min(class_tiles, (4 * num_sms(x.device)) // max(row_tiles, 1))) if x.is_cuda else 1


@guard_device
def forward(x, w, labels, rx, rw, s, tau, need_o):
    """``(lse_nt, o)`` as :func:`mdkernels.ops.margin_ce.torch_backend.forward`."""
    B, D = x.shape
    C = w.shape[0]
    cd = compute_dtype(x)
    flags = triton_flags(x.dtype, x.is_cuda)

    def launch(cfg):
        row_tiles, class_tiles = triton.cdiv(B, cfg["BLOCK_B"]), triton.cdiv(C, cfg["BLOCK_C"])
        splits = _splits(x, row_tiles, class_tiles)
        per_split = triton.cdiv(class_tiles, splits) * cfg["BLOCK_C"]
        splits = triton.cdiv(C, per_split)
        d_splits = triton.cdiv(D, cfg["BLOCK_DO"]) if need_o else 1
        m = torch.empty(splits, B, dtype=cd, device=x.device)
        l = torch.empty_like(m)
        o = torch.empty(splits, B, D, dtype=cd, device=x.device) if need_o else m
        _margin_ce_forward_kernel[(row_tiles, splits, d_splits)](
            x, w, rx, rw, labels, m, l, o, B, C, D, x.stride(0), w.stride(0), per_split, float(s),
            float(tau if tau is not None else 0.0), HAS_FILTER=tau is not None, NEED_O=need_o, **flags, **cfg,
        )  # fmt: skip
        return m, l, o

    m, l, o = launch(autotuned("forward", x, B, C, D, launch))
    m_max = m.max(0).values
    scale = torch.exp(m - m_max)
    total = (l * scale).sum(0)
    lse_nt = m_max + torch.log(total)
    if not need_o:
        return lse_nt, None
    o = torch.einsum("sbd,sb->bd", o, scale)
    return lse_nt, o * torch.where(total > 0, s / total, torch.zeros_like(total))[:, None]


@guard_device
def center_grad(x, w, labels, rx, rw, lse, gr, coef, raw_t, s, tau):
    """``dL/dW`` (C, D) in the centers' dtype, as :func:`mdkernels.ops.margin_ce.torch_backend.center_grad`."""
    B, D = x.shape
    C = w.shape[0]
    dw = torch.empty_like(w)
    gscale = grad_scale(gr, coef, s).to(rx.dtype)
    flags = triton_flags(x.dtype, x.is_cuda)

    def launch(cfg):
        grid = (triton.cdiv(C, cfg["BLOCK_C"]), triton.cdiv(D, cfg["BLOCK_DO"]))
        _margin_ce_center_grad_kernel[grid](
            x, w, rx, rw, labels, lse, gr, coef, gscale, dw, B, C, D, x.stride(0), w.stride(0), dw.stride(0),
            float(s), float(tau if tau is not None else 0.0), HAS_FILTER=tau is not None, **flags, **cfg,
        )  # fmt: skip

    if C and B:
        launch(autotuned("center_grad", x, B, C, D, launch))
    else:
        dw.zero_()
    return dw


def compile_specs(dtype: torch.dtype, B: int = 1024, D: int = 512) -> list:
    """The kernels as the GPU launcher compiles them for ``dtype`` at D = 512 (resident) and D = 1024 (split
    over the grid): (name, kernel, runtime signature, constexprs, options), for
    :mod:`mdkernels.tools.gpu_compile` (checks without a GPU)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    flags = triton_flags(dtype, on_cuda=True)
    common = {"X": ptr(dtype), "W": ptr(dtype), "RX": ptr(acc), "RW": ptr(acc), "Y": "*i64", "B": "i32", "C": "i32",
              "D": "i32", "stride_x": "i32", "stride_w": "i32", "s": "fp32", "tau": "fp32"}  # fmt: skip
    fwd = {**common, "M_OUT": ptr(acc), "L_OUT": ptr(acc), "O_OUT": ptr(acc), "classes_per_split": "i32"}
    bwd = {**common, "LSE": ptr(acc), "GR": ptr(acc), "COEF": ptr(acc), "GSCALE": ptr(acc), "DW": ptr(dtype),
           "stride_dw": "i32"}  # fmt: skip
    specs = []
    # every variant at D = 512 (resident); the D split at 1024 with the variants of most registers
    variants = [(D, flt, need_o) for flt in (False, True) for need_o in (False, True)] + [(1024, False, True)]
    for d, flt, need_o in variants:
        fcfg, gcfg = tile_config("forward", dtype, B, d), tile_config("center_grad", dtype, B, d)
        fopts = {"num_warps": fcfg.pop("num_warps"), "num_stages": fcfg.pop("num_stages")}
        gopts = {"num_warps": gcfg.pop("num_warps"), "num_stages": gcfg.pop("num_stages")}
        specs.append((f"margin_ce_forward D={d} filter={flt} need_o={need_o}", _margin_ce_forward_kernel, fwd,
                      {"HAS_FILTER": flt, "NEED_O": need_o, **fcfg, **flags}, fopts))  # fmt: skip
        if need_o:
            specs.append((f"margin_ce_center_grad D={d} filter={flt}", _margin_ce_center_grad_kernel, bwd,
                          {"HAS_FILTER": flt, **gcfg, **flags}, gopts))  # fmt: skip
    return specs
