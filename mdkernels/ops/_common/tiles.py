"""Triton tile helpers shared by the margin ops, their tile configurations and compile flags.

``cos_tile`` builds one (rows x classes) tile of raw cosines over all of D; ``scatter_grads`` adds a
tile's gradient products into fp32 buffers. ``margin_tile_config`` is the one place the margin kernels'
tile sizes are chosen: the launchers and the compile check both read it.
"""

from __future__ import annotations

import torch

from mdkernels.ops._common.env import HAS_TRITON, interpreting

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def cos_tile(
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
        BLOCK_B: tl.constexpr,
        BLOCK_C: tl.constexpr,
        BLOCK_D: tl.constexpr,
        ACC_DTYPE: tl.constexpr,
        UPCAST: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        """Raw cosines ``(x_i . w_j) / (|x_i| |w_j|)`` of one (rows x cols) tile, unclamped."""
        acc = tl.zeros((BLOCK_B, BLOCK_C), dtype=ACC_DTYPE)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_mask = dd < D
            xt = tl.load(
                X + rows[:, None].to(tl.int64) * stride_x + dd[None, :],
                mask=row_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            wt = tl.load(
                W + cols[:, None].to(tl.int64) * stride_w + dd[None, :],
                mask=col_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            if UPCAST:  # the interpreter's low-precision dot is unreliable
                xt = xt.to(ACC_DTYPE)
                wt = wt.to(ACC_DTYPE)
            acc = tl.dot(xt, tl.trans(wt), acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        rx = tl.load(RX + rows, mask=row_mask, other=0.0)
        rw = tl.load(RW + cols, mask=col_mask, other=0.0)
        return acc * rx[:, None] * rw[None, :]

    @triton.jit
    def scatter_grads(g, X, W, RX, RW, DXH, DWH, rows, cols, row_mask, col_mask, D, stride_x, stride_w, gscale,
                       COMPUTE_DW: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
                       UPCAST: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
        """Given ``G = dL/dcos / gscale`` of one (rows x cols) tile: ``DXH += gscale G n(W)``, and
        ``DWH += gscale G^T n(x)`` when COMPUTE_DW, over all of D (fp32 atomics: tiles of other programs add
        to the same rows/cols). G enters the dots in the input dtype: gscale keeps it away from fp16's
        underflow (see ``mdkernels.ops._common.epilogue.grad_scale``)."""
        rx = tl.load(RX + rows, mask=row_mask, other=0.0)
        rw = tl.load(RW + cols, mask=col_mask, other=0.0)
        # dL/dx^_i = sum_j g_ij w_j / |w_j|, dL/dw^_j = sum_i g_ij x_i / |x_i|: the tiles are normalised in
        # the accumulator dtype before the dots, so every operand is bounded (|n(.)| <= 1, a zero row
        # stays zero) whatever the norms; G is cast once.
        g_in = g.to(X.dtype.element_ty) if not UPCAST else g
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_mask = dd < D
            wt = tl.load(
                W + cols[:, None].to(tl.int64) * stride_w + dd[None, :],
                mask=col_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            wt = (wt.to(ACC_DTYPE) * rw[:, None]).to(g_in.dtype)
            dx = tl.dot(g_in, wt, input_precision=PRECISION, out_dtype=ACC_DTYPE)
            tl.atomic_add(
                DXH + rows[:, None].to(tl.int64) * D + dd[None, :],
                dx * gscale,
                mask=row_mask[:, None] & d_mask[None, :],
            )
            if COMPUTE_DW:
                xt = tl.load(
                    X + rows[:, None].to(tl.int64) * stride_x + dd[None, :],
                    mask=row_mask[:, None] & d_mask[None, :],
                    other=0.0,
                )
                xt = (xt.to(ACC_DTYPE) * rx[:, None]).to(g_in.dtype)
                dw = tl.dot(tl.trans(g_in), xt, input_precision=PRECISION, out_dtype=ACC_DTYPE)
                tl.atomic_add(
                    DWH + cols[:, None].to(tl.int64) * D + dd[None, :],
                    dw * gscale,
                    mask=col_mask[:, None] & d_mask[None, :],
                )


def margin_tile_config(dtype: torch.dtype, B: int, D: int) -> dict:
    """Tile sizes. Interpreter: big tiles (each program-iteration costs ~ms). GPU: untuned defaults."""
    block_b = max(16, min(64, triton.next_power_of_2(max(B, 1))))
    if interpreting():
        return dict(
            BLOCK_B=block_b,
            BLOCK_C=256,
            BLOCK_D=max(16, min(512, triton.next_power_of_2(D))),
            num_warps=4,
            num_stages=1,
        )
    if dtype in (torch.float32, torch.float64):
        return dict(BLOCK_B=min(block_b, 64), BLOCK_C=64, BLOCK_D=32, num_warps=4, num_stages=2)
    return dict(BLOCK_B=block_b, BLOCK_C=128, BLOCK_D=64, num_warps=8, num_stages=3)


def triton_flags(dtype: torch.dtype, on_cuda: bool) -> dict:
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    allow_tf32 = on_cuda and torch.backends.cuda.matmul.allow_tf32
    precision = "tf32" if (dtype in (torch.float16, torch.bfloat16) or allow_tf32) else "ieee"
    upcast = interpreting() and dtype in (torch.float16, torch.bfloat16)
    return dict(ACC_DTYPE=acc, UPCAST=upcast, PRECISION=precision)


