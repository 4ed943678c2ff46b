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

import math
import os

import torch

from mdkernels import _cuda_ext
from mdkernels._cuda_ext import guard_device
from mdkernels._validate import check_label_values
from mdkernels.ops.l2norm import normalize_backward, row_rnorm
from mdkernels.ops.margin import margin_target_and_slope

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs may not have Triton
    HAS_TRITON = False

NEG_BIG = -1e30  # finite "minus infinity" for the running max: keeps exp(m_old - m_new) free of NaN


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------
if HAS_TRITON:
    _NEG_BIG = tl.constexpr(NEG_BIG)  # globals read inside @triton.jit must be constexpr

    @triton.jit
    def _cos_tile(
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
    def _scatter_grads(g, X, W, RX, RW, DXH, DWH, rows, cols, row_mask, col_mask, D, stride_x, stride_w, gscale,
                       COMPUTE_DW: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
                       UPCAST: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
        """Given ``G = dL/dcos / gscale`` of one (rows x cols) tile: ``DXH += gscale G n(W)``, and
        ``DWH += gscale G^T n(x)`` when COMPUTE_DW, over all of D (fp32 atomics: tiles of other programs add
        to the same rows/cols). G enters the dots in the input dtype: gscale keeps it away from fp16's
        underflow (see ``_grad_scale``)."""
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
            cos = _cos_tile(
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
            raw = _cos_tile(
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
            _scatter_grads(g, X, W, RX, RW, DXH, DWH, rows, cols, row_mask, col_mask, D, stride_x, stride_w, gscale,
                           COMPUTE_DW, BLOCK_D, ACC_DTYPE, UPCAST, PRECISION)  # fmt: skip


def _triton_config(dtype: torch.dtype, B: int, D: int) -> dict:
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


def _triton_flags(dtype: torch.dtype, on_cuda: bool) -> dict:
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    allow_tf32 = on_cuda and torch.backends.cuda.matmul.allow_tf32
    precision = "tf32" if (dtype in (torch.float16, torch.bfloat16) or allow_tf32) else "ieee"
    upcast = interpreting() and dtype in (torch.float16, torch.bfloat16)
    return dict(ACC_DTYPE=acc, UPCAST=upcast, PRECISION=precision)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def compile_specs(dtype: torch.dtype, B: int = 1024, D: int = 512) -> list:
    """The kernels as the GPU launcher would compile them for ``dtype``: (name, kernel, runtime
    signature, constexprs, options), for :mod:`mdkernels.ops.gpu_compile` (checks without a GPU)."""
    from mdkernels.ops.gpu_compile import ptr

    cfg = _triton_config(dtype, B, D)
    opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    flags = _triton_flags(dtype, on_cuda=True)
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
def _lse_nontarget_triton(x, w, labels, rx, rw, s, tau) -> torch.Tensor:
    B, D = x.shape
    C = w.shape[0]
    cfg = _triton_config(x.dtype, B, D)
    bb, bc = cfg["BLOCK_B"], cfg["BLOCK_C"]
    row_tiles = triton.cdiv(B, bb)
    class_tiles = triton.cdiv(C, bc)
    # split-C: enough programs to fill the GPU when the batch alone gives few row tiles
    splits = max(1, min(class_tiles, (4 * _num_sms(x.device)) // row_tiles)) if x.is_cuda else 1
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
        **_triton_flags(x.dtype, x.is_cuda),
        **cfg,
    )
    m_max = m.max(0).values
    return m_max + torch.log((l * torch.exp(m - m_max)).sum(0))


def _grad_scale(gr: torch.Tensor) -> torch.Tensor:
    """``max |gr|`` as a one-element device tensor (no host sync). The backward kernels form
    ``G / max|gr|`` (entries bounded by s, or s((1 - alpha) + alpha T) for KD) and multiply it with the
    normalised tiles, every operand bounded, then scale the fp32 sums back: with G itself, fp16 operands
    would flush 1/B-sized gradient terms to zero."""
    if gr.numel() == 0:
        return torch.ones(1, dtype=torch.float32, device=gr.device)
    return gr.abs().amax().float().clamp_min(torch.finfo(torch.float32).tiny).reshape(1)


@guard_device
def _grad_hat_triton(x, w, labels, rx, rw, lse, gr, s, tau, need_dw):
    B, D = x.shape
    C = w.shape[0]
    cd = compute_dtype(x)
    cfg = _triton_config(x.dtype, B, D)
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
        _grad_scale(gr).to(cd),
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
        **_triton_flags(x.dtype, x.is_cuda),
        **cfg,
    )
    return dxh, (dwh if need_dw else None)


# ----------------------------------------------------------------------------------------------------
# CUDA C++ backend (csrc/margin_ce.cu): same contract as the Triton launchers
# ----------------------------------------------------------------------------------------------------
@guard_device
def _lse_nontarget_cuda(x, w, labels, rx, rw, s, tau) -> torch.Tensor:
    ext = _cuda_ext.ext
    B, D = x.shape
    C = w.shape[0]
    bn = ext.margin_tile_classes
    row_tiles, class_tiles = -(-B // 64), -(-C // bn)
    splits = max(1, min(class_tiles, (4 * _num_sms(x.device)) // max(row_tiles, 1)))
    per_split = -(-class_tiles // splits) * bn
    splits = -(-C // per_split)
    m = torch.empty(splits, B, dtype=torch.float32, device=x.device)
    l = torch.empty_like(m)
    ext.margin_lse_forward(
        _cuda_ext.dtype_code(x),
        x.data_ptr(),
        w.data_ptr(),
        rx.data_ptr(),
        rw.data_ptr(),
        labels.data_ptr(),
        m.data_ptr(),
        l.data_ptr(),
        B,
        C,
        D,
        x.stride(0),
        w.stride(0),
        splits,
        per_split,
        float(s),
        float(tau if tau is not None else 0.0),
        tau is not None,
        _cuda_ext.stream_of(x),
    )
    m_max = m.max(0).values
    return m_max + torch.log((l * torch.exp(m - m_max)).sum(0))


@guard_device
def _grad_hat_cuda(x, w, labels, rx, rw, lse, gr, s, tau, need_dw):
    B, D = x.shape
    C = w.shape[0]
    dxh = torch.zeros(B, D, dtype=torch.float32, device=x.device)
    dwh = torch.zeros(C, D, dtype=torch.float32, device=x.device) if need_dw else None
    gr = gr.contiguous()
    gscale = _grad_scale(gr)
    _cuda_ext.ext.margin_ce_backward(
        _cuda_ext.dtype_code(x),
        x.data_ptr(),
        w.data_ptr(),
        rx.data_ptr(),
        rw.data_ptr(),
        labels.data_ptr(),
        lse.contiguous().data_ptr(),
        gr.data_ptr(),
        gscale.data_ptr(),
        dxh.data_ptr(),
        dwh.data_ptr() if need_dw else 0,
        B,
        C,
        D,
        x.stride(0),
        w.stride(0),
        float(s),
        float(tau if tau is not None else 0.0),
        tau is not None,
        _cuda_ext.stream_of(x),
    )
    return dxh, dwh


# ----------------------------------------------------------------------------------------------------
# Chunked torch backend (CPU default): the same algorithm, one class chunk at a time
# ----------------------------------------------------------------------------------------------------
_CHUNK_ELEMENTS = 1 << 20  # B x chunk logits per step: 4 MB in fp32


def _chunk_size(B: int, C: int) -> int:
    return max(256, min(C, _CHUNK_ELEMENTS // max(B, 1)))


def _chunk_cos(xh, w, rw, c0, c1):
    """Raw cosines of all rows against centers [c0, c1): (B, c1-c0). The center chunk is never
    normalised in memory: its (B, chunk) product is scaled by 1/|w_j| instead (fewer elements)."""
    return (xh @ w[c0:c1].to(xh.dtype).T).mul_(rw[None, c0:c1])


def _target_mask(labels, c0, c1):
    rows = ((labels >= c0) & (labels < c1)).nonzero().squeeze(1)
    return rows, labels[rows] - c0


def _lse_nontarget_torch(x, w, labels, rx, rw, s, tau) -> torch.Tensor:
    B, C = x.shape[0], w.shape[0]
    xh = x.to(rx.dtype) * rx[:, None]
    m = torch.full((B,), NEG_BIG, dtype=rx.dtype, device=x.device)
    l = torch.zeros(B, dtype=rx.dtype, device=x.device)
    step = _chunk_size(B, C)
    for c0 in range(0, C, step):
        c1 = min(C, c0 + step)
        z = _chunk_cos(xh, w, rw, c0, c1)
        z.clamp_(-1.0, 1.0)
        if tau is not None:
            z.masked_fill_(z > tau, 0.0)
        z.mul_(s)
        rows, cols = _target_mask(labels, c0, c1)
        z[rows, cols] = -math.inf
        m_new = torch.maximum(m, z.max(1).values)
        z.sub_(m_new[:, None]).exp_()
        l = l * torch.exp(m - m_new) + z.sum(1)
        m = m_new
    return m + torch.log(l)


def _grad_hat_torch(x, w, labels, rx, rw, lse, gr, s, tau, need_dw, target_dw):
    """dL/dx^ (B, D) without the target term, and, when need_dw, the finished dL/dW (C, D).

    ``target_dw(c0, c1, rows_local, coef)`` supplies the target term for a chunk of centers so the
    normalisation backward can run chunk by chunk (no second (C, D) buffer).
    """
    B, C = x.shape[0], w.shape[0]
    xh = x.to(rx.dtype) * rx[:, None]
    dxh = torch.zeros_like(xh)
    dw = torch.empty_like(w) if need_dw else None
    step = _chunk_size(B, C)
    for c0 in range(0, C, step):
        c1 = min(C, c0 + step)
        raw = _chunk_cos(xh, w, rw, c0, c1)
        keep = (raw >= -1.0) & (raw <= 1.0)
        raw.clamp_(-1.0, 1.0)
        if tau is not None:
            keep &= raw <= tau
            raw.masked_fill_(raw > tau, 0.0)
        rows, cols = _target_mask(labels, c0, c1)
        keep[rows, cols] = False
        # masked entries go to exp(-inf) = 0 *before* the exp: the un-margined target logit may overflow
        g = raw.mul_(s).sub_(lse[:, None]).masked_fill_(~keep, -math.inf).exp_().mul_(gr[:, None] * s)
        dxh.addmm_(g * rw[None, c0:c1], w[c0:c1].to(xh.dtype))  # dL/dx^ = sum_j g_ij w_j / |w_j|
        if need_dw:
            dwh = g.T @ xh
            dwh.index_add_(0, cols, target_dw(rows))
            normalize_backward(w[c0:c1], dwh, out=dw[c0:c1])
    return dxh, dw


# ----------------------------------------------------------------------------------------------------
# The op pair (one for every fused backend) and its autograd
# ----------------------------------------------------------------------------------------------------
def _check_backend_device(x: torch.Tensor, backend: str) -> None:
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        if not x.is_cuda and not interpreting():
            raise ValueError(
                "backend='triton' runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 is set "
                "before importing mdkernels; use backend='torch' on the CPU"
            )
    elif backend == "cuda":
        if x.dtype == torch.float64 or not _cuda_ext.usable(x):
            raise ValueError(
                "backend='cuda' needs CUDA fp32/bf16/fp16 tensors and the CUDA module built for this GPU "
                "(mdkernels.info()['cuda_extension'])"
            )
    elif backend != "torch":
        raise ValueError(f"unknown fused backend {backend!r}")


def _target_cos(x, w, labels, rx, rw, ignore_index):
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    raw = (x.to(rx.dtype) * w[safe].to(rx.dtype)).sum(1) * rx * rw[safe]
    return valid, safe, raw


@guard_device
def _target_cuda(x, w, labels_k, rx, rw, m2, s, m1, m3, fallback, grad):
    """The CUDA row kernel (csrc/margin_target.cu): ``(raw_t, z_t, slope)`` in one launch, one warp per
    row (rows with ``labels_k < 0``: zeros). Same values as :func:`_target_cos` plus
    :func:`margin_target_and_slope` in fp32."""
    B, D = x.shape
    raw, z, slope = (torch.empty(B, dtype=torch.float32, device=x.device) for _ in range(3))
    m2 = m2.to(torch.float32).expand(B).contiguous()
    _cuda_ext.ext.margin_target_forward(
        _cuda_ext.dtype_code(x),
        x.data_ptr(),
        w.data_ptr(),
        labels_k.data_ptr(),
        rx.data_ptr(),
        rw.data_ptr(),
        m2.data_ptr(),
        raw.data_ptr(),
        z.data_ptr(),
        slope.data_ptr(),
        B,
        D,
        x.stride(0),
        w.stride(0),
        float(s),
        float(m1),
        float(m3),
        bool(fallback),
        grad == "straight_through",
        _cuda_ext.stream_of(x),
    )
    return raw, z, slope


def _target_terms(x, w, labels_k, rx, rw, m2, s, m1, m3, fallback, grad, backend):
    """``(raw_t, z_t, slope)`` of every row (``labels_k < 0``: ignored): the CUDA row kernel for
    ``backend="cuda"``, else the gather-dot and :func:`margin_target_and_slope` in torch."""
    if backend == "cuda":  # gather, dot and margin in one row kernel
        return _target_cuda(x, w, labels_k, rx, rw, m2, s, m1, m3, fallback, grad)
    _, _, raw_t = _target_cos(x, w, labels_k, rx, rw, -1)
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
    _check_backend_device(x, backend)
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


def finish_center_grad(w, dwh, safe, coef, xh):
    """Kernel backends' dW epilogue: add the per-row target term ``coef_i n(x_i)`` to row ``y_i`` of the
    fp32 ``dW^`` buffer, then the normalisation backward (in place when the dtypes allow)."""
    dwh.index_add_(0, safe, coef[:, None] * xh)
    return normalize_backward(w, dwh, out=dwh if dwh.dtype == w.dtype else None)


def finish_embedding_grad(x, dxh, w, safe, rw, coef):
    """Every backend's dx epilogue: add the per-row target term ``coef_i n(w_{y_i})`` to ``dx^``, then the
    normalisation backward. Centers without rows (an empty shard) contribute no target term."""
    if w.shape[0]:
        dxh += coef[:, None] * (w[safe].to(dxh.dtype) * rw[safe, None])
    return normalize_backward(x, dxh)


LSE_NONTARGET = {"triton": _lse_nontarget_triton, "cuda": _lse_nontarget_cuda, "torch": _lse_nontarget_torch}
GRAD_HAT = {"triton": _grad_hat_triton, "cuda": _grad_hat_cuda}  # the torch path fuses its own dW epilogue


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
        dxh, dw = _grad_hat_torch(
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
