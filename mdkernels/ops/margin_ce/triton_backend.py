"""Triton backend of the fused margin CE: the split-C non-target logsumexp and the backward tiles."""

from __future__ import annotations

import torch

from mdkernels._cuda_ext import guard_device
from mdkernels._spec import compute_dtype
from mdkernels.ops._common.env import HAS_TRITON, NEG_BIG, num_sms, ptr
from mdkernels.ops._common.epilogue import grad_scale
from mdkernels.ops._common.tiles import margin_tile_config, triton_flags

if HAS_TRITON:
    import triton
    import triton.language as tl

    from mdkernels.ops._common.tiles import cos_tile, scatter_grads

    _NEG_BIG = tl.constexpr(NEG_BIG)  # globals read inside @triton.jit must be constexpr

    @triton.jit
    def _margin_ce_forward_kernel(
        X,
        W,
        RX,
        RW,
        Y,
        M_OUT,
        L_OUT,
        B,
        C,
        D,
        stride_x,
        stride_w,
        classes_per_split,
        s,
        tau,
        HAS_FILTER: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_D: tl.constexpr,
        ACC_DTYPE: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Per (row tile, class split): running max ``M`` and sum-exp ``L`` of non-target ``s*c``."""
        pid_b = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        row_mask = rows < B
        y = tl.load(Y + rows, mask=row_mask, other=-1)
        m = tl.full((BLOCK_B,), _NEG_BIG, dtype=ACC_DTYPE)
        l = tl.zeros((BLOCK_B,), dtype=ACC_DTYPE)
        c_begin = pid_s * classes_per_split
        c_end = tl.minimum(c_begin + classes_per_split, C)
        for c0 in range(c_begin, c_end, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_mask = cols < c_end
            cos = cos_tile(
                X,
                W,
                RX,
                RW,
                rows,
                cols,
                row_mask,
                col_mask,
                D,
                stride_x,
                stride_w,
                BLOCK_B,
                BLOCK_C,
                BLOCK_D,
                ACC_DTYPE,
                UPCAST,
                PRECISION,
            )
            cos = tl.minimum(tl.maximum(cos, -1.0), 1.0)
            if HAS_FILTER:
                cos = tl.where(cos > tau, 0.0, cos)
            z = cos * s
            z = tl.where((cols[None, :] == y[:, None]) | (~col_mask[None, :]), float("-inf"), z)
            m_new = tl.maximum(m, tl.max(z, 1))
            l = l * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), 1)
            m = m_new
        tl.store(M_OUT + pid_s * B + rows, m, mask=row_mask)
        tl.store(L_OUT + pid_s * B + rows, l, mask=row_mask)

    @triton.jit
    def _margin_ce_backward_kernel(
        X,
        W,
        RX,
        RW,
        Y,
        LSE,
        GR,
        GSCALE,
        DXH,
        DWH,
        B,
        C,
        D,
        stride_x,
        stride_w,
        s,
        tau,
        HAS_FILTER: tl.constexpr,
        COMPUTE_DW: tl.constexpr,
        BLOCK_B: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_D: tl.constexpr,
        ACC_DTYPE: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """One (row tile, class tile): recompute the tile, then ``dx^ += G n(W)``, ``dW^ += G^T n(x)``."""
        pid_c = tl.program_id(0)  # class tiles on axis 0: CUDA caps grid axis 1 at 65535
        pid_b = tl.program_id(1)
        rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        row_mask = rows < B
        col_mask = cols < C
        gr = tl.load(GR + rows, mask=row_mask, other=0.0)
        if tl.max(tl.abs(gr), 0) != 0:  # tiles of ignored rows (zero weight) contribute nothing
            y = tl.load(Y + rows, mask=row_mask, other=-1)
            lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
            raw = cos_tile(
                X,
                W,
                RX,
                RW,
                rows,
                cols,
                row_mask,
                col_mask,
                D,
                stride_x,
                stride_w,
                BLOCK_B,
                BLOCK_C,
                BLOCK_D,
                ACC_DTYPE,
                UPCAST,
                PRECISION,
            )
            keep = (raw >= -1.0) & (raw <= 1.0)  # the clamp passes no gradient outside [-1, 1]
            cos = tl.minimum(tl.maximum(raw, -1.0), 1.0)
            if HAS_FILTER:
                keep = keep & (cos <= tau)
                cos = tl.where(cos > tau, 0.0, cos)
            keep = keep & (cols[None, :] != y[:, None]) & col_mask[None, :] & row_mask[:, None]
            gscale = tl.load(GSCALE)
            g = tl.where(keep, tl.exp(cos * s - lse[:, None]) * (s * (gr / gscale)[:, None]), 0.0)
            scatter_grads(g, X, W, RX, RW, DXH, DWH, rows, cols, row_mask, col_mask, D, stride_x, stride_w, gscale,
                           COMPUTE_DW, BLOCK_D, ACC_DTYPE, UPCAST, PRECISION)  # fmt: skip



def compile_specs(dtype: torch.dtype, B: int = 1024, D: int = 512) -> list:
    """The kernels as the GPU launcher would compile them for ``dtype``: (name, kernel, runtime
    signature, constexprs, options), for :mod:`mdkernels.tools.gpu_compile` (checks without a GPU)."""
    cfg = margin_tile_config(dtype, B, D)
    opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    flags = triton_flags(dtype, on_cuda=True)
    common = {"X": ptr(dtype), "W": ptr(dtype), "RX": ptr(acc), "RW": ptr(acc), "Y": "*i64"}
    ints = {"B": "i32", "C": "i32", "D": "i32", "stride_x": "i32", "stride_w": "i32"}
    fwd = {
        **common,
        "M_OUT": ptr(acc),
        "L_OUT": ptr(acc),
        **ints,
        "classes_per_split": "i32",
        "s": "fp32",
        "tau": "fp32",
    }
    bwd = {
        **common,
        "LSE": ptr(acc),
        "GR": ptr(acc),
        "GSCALE": ptr(acc),
        "DXH": ptr(acc),
        "DWH": ptr(acc),
        **ints,
        "s": "fp32",
        "tau": "fp32",
    }
    specs = []
    for flt in (False, True):
        specs.append((f"margin_ce_forward filter={flt}", _margin_ce_forward_kernel, fwd,
                      {"HAS_FILTER": flt, **cfg, **flags}, opts))  # fmt: skip
        for dw in (False, True):
            specs.append((f"margin_ce_backward filter={flt} dw={dw}", _margin_ce_backward_kernel, bwd,
                          {"HAS_FILTER": flt, "COMPUTE_DW": dw, **cfg, **flags}, opts))  # fmt: skip
    return specs


@guard_device
def lse_nontarget(x, w, labels, rx, rw, s, tau) -> torch.Tensor:
    B, D = x.shape
    C = w.shape[0]
    cfg = margin_tile_config(x.dtype, B, D)
    bb, bc = cfg["BLOCK_B"], cfg["BLOCK_C"]
    row_tiles = triton.cdiv(B, bb)
    class_tiles = triton.cdiv(C, bc)
    # split-C: enough programs to fill the GPU when the batch alone gives few row tiles
    splits = max(1, min(class_tiles, (4 * num_sms(x.device)) // row_tiles)) if x.is_cuda else 1
    per_split = triton.cdiv(class_tiles, splits) * bc
    splits = triton.cdiv(C, per_split)
    cd = compute_dtype(x)
    m = torch.empty(splits, B, dtype=cd, device=x.device)
    l = torch.empty(splits, B, dtype=cd, device=x.device)
    _margin_ce_forward_kernel[(row_tiles, splits)](
        x,
        w,
        rx,
        rw,
        labels,
        m,
        l,
        B,
        C,
        D,
        x.stride(0),
        w.stride(0),
        per_split,
        float(s),
        float(tau if tau is not None else 0.0),
        HAS_FILTER=tau is not None,
        **triton_flags(x.dtype, x.is_cuda),
        **cfg,
    )
    m_max = m.max(0).values
    return m_max + torch.log((l * torch.exp(m - m_max)).sum(0))



@guard_device
def grad_hat(x, w, labels, rx, rw, lse, gr, s, tau, need_dw):
    B, D = x.shape
    C = w.shape[0]
    cd = compute_dtype(x)
    cfg = margin_tile_config(x.dtype, B, D)
    dxh = torch.zeros(B, D, dtype=cd, device=x.device)
    dwh = torch.zeros(C, D, dtype=cd, device=x.device) if need_dw else dxh  # dummy pointer when unused
    grid = (triton.cdiv(C, cfg["BLOCK_C"]), triton.cdiv(B, cfg["BLOCK_B"]))
    _margin_ce_backward_kernel[grid](
        x,
        w,
        rx,
        rw,
        labels,
        lse,
        gr,
        grad_scale(gr).to(cd),
        dxh,
        dwh,
        B,
        C,
        D,
        x.stride(0),
        w.stride(0),
        float(s),
        float(tau if tau is not None else 0.0),
        HAS_FILTER=tau is not None,
        COMPUTE_DW=need_dw,
        **triton_flags(x.dtype, x.is_cuda),
        **cfg,
    )
    return dxh, (dwh if need_dw else None)


