"""Triton backend of angular distillation: one row kernel per direction, each input read once."""

from __future__ import annotations

import torch

from mdkernels._cuda_ext import guard_device
from mdkernels._math import EPS, compute_dtype
from mdkernels.ops._common.env import HAS_TRITON, LAUNCH_OPTIONS, gpu_tiles, ptr

if HAS_TRITON:
    import triton
    import triton.language as tl

    _EPS = tl.constexpr(EPS)  # globals read inside @triton.jit must be constexpr

    @triton.jit(do_not_specialize=("R",))  # the row count bounds masks only
    def _angular_forward_kernel(
        S, T, LOSS, NS, NT, COS, R, D, stride_s, stride_t, p,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = rows < R
        ss = tl.zeros((BLOCK_R,), ACC_DTYPE)
        tt = tl.zeros((BLOCK_R,), ACC_DTYPE)
        st = tl.zeros((BLOCK_R,), ACC_DTYPE)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (dd < D)[None, :]
            s = tl.load(S + rows[:, None].to(tl.int64) * stride_s + dd[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
            t = tl.load(T + rows[:, None].to(tl.int64) * stride_t + dd[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
            ss += tl.sum(s * s, 1)
            tt += tl.sum(t * t, 1)
            st += tl.sum(s * t, 1)
        ns = tl.sqrt(ss)
        nt = tl.sqrt(tt)
        cos = st / (tl.maximum(ns, _EPS) * tl.maximum(nt, _EPS))
        gap = tl.maximum(1.0 - cos, 0.0)
        loss = tl.where(gap > 0, tl.exp(p * tl.log(gap)), 0.0)
        tl.store(LOSS + rows, loss, mask=row_mask)
        tl.store(NS + rows, ns, mask=row_mask)
        tl.store(NT + rows, nt, mask=row_mask)
        tl.store(COS + rows, cos, mask=row_mask)

    @triton.jit(do_not_specialize=("R",))
    def _angular_backward_kernel(
        S, T, G, NS, NT, COS, DS, R, D, stride_s, stride_t, p,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_mask = rows < R
        g = tl.load(G + rows, mask=row_mask, other=0.0)
        ns = tl.load(NS + rows, mask=row_mask, other=1.0)
        nt = tl.load(NT + rows, mask=row_mask, other=1.0)
        cos = tl.load(COS + rows, mask=row_mask, other=0.0)
        gap = tl.maximum(1.0 - cos, 0.0)
        # d loss / d cos = -p * gap^(p-1)  (0 where the gap is 0, unless p == 1)
        dcos = tl.where(gap > 0, -p * tl.exp((p - 1.0) * tl.log(gap)), tl.where(p == 1.0, -1.0, 0.0)) * g
        rs = 1.0 / tl.maximum(ns, _EPS)
        rt = 1.0 / tl.maximum(nt, _EPS)
        proj = tl.where(ns < _EPS, 0.0, cos * rs)  # the projection term vanishes where n(s) is linear
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (dd < D)[None, :]
            s = tl.load(S + rows[:, None].to(tl.int64) * stride_s + dd[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
            t = tl.load(T + rows[:, None].to(tl.int64) * stride_t + dd[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
            ds = dcos[:, None] * (t * rt[:, None] - s * proj[:, None]) * rs[:, None]
            tl.store(DS + rows[:, None].to(tl.int64) * D + dd[None, :], ds.to(DS.dtype.element_ty), mask=mask)


def _config(D: int, dtype: torch.dtype) -> dict:
    wide = 128 if dtype in (torch.float32, torch.float64) else 256  # fp32's 256-column step spilled (Triton 3.7)
    block_d = min(wide if gpu_tiles() else 1024, triton.next_power_of_2(max(D, 16)))
    return dict(BLOCK_R=8 if gpu_tiles() else 64, BLOCK_D=block_d)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def launch_specs(arch: int) -> list:
    """Every kernel a GPU launch can compile (see :mod:`mdkernels.tools.gpu_compile`): fp16, bf16, fp32 and fp64,
    each column step D can give (16 up to the dtype's widest), aligned and odd. The same tiles on every arch."""
    specs = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        acc = ptr(torch.float64 if dtype == torch.float64 else torch.float32)
        rows = {"R": "i32", "D": "i32", "stride_s": "i32", "stride_t": "i32", "p": "fp32"}
        fwd = {"S": ptr(dtype), "T": ptr(dtype), "LOSS": acc, "NS": acc, "NT": acc, "COS": acc, **rows}
        bwd = {"S": ptr(dtype), "T": ptr(dtype), "G": acc, "NS": acc, "NT": acc, "COS": acc, "DS": ptr(dtype), **rows}
        for d, kind in ((16, "aligned"), (32, "aligned"), (27, "odd"), (64, "aligned"), (63, "odd"), (128, "aligned"),
                        (100, "odd"), (256, "aligned"), (250, "odd"), (4032, "aligned"), (4033, "odd")):  # fmt: skip
            const = {**_config(d, dtype), "ACC_DTYPE": _acc(dtype)}
            ints = {"D": d, "stride_s": d, "stride_t": d}
            name = f"{str(dtype).removeprefix('torch.')} D={d} {kind}"
            specs += [(f"angular_forward {name}", _angular_forward_kernel, fwd, const, {}, ints),
                      (f"angular_backward {name}", _angular_backward_kernel, bwd, const, {}, ints)]  # fmt: skip
    return specs


@guard_device
def forward(s, t, p):
    """Row losses and the statistics ``(|s|, |t|, cos)``, all ``(R,)``."""
    R, D = s.shape
    cd = compute_dtype(s)
    loss, ns, nt, cos = (torch.empty(R, dtype=cd, device=s.device) for _ in range(4))
    cfg = _config(D, s.dtype)
    if R:
        _angular_forward_kernel[(triton.cdiv(R, cfg["BLOCK_R"]),)](
            s, t, loss, ns, nt, cos, R, D, s.stride(0), t.stride(0), float(p), ACC_DTYPE=_acc(s.dtype), **cfg,
            **LAUNCH_OPTIONS,
        )
    return loss, ns, nt, cos


@guard_device
def backward(g, s, t, ns, nt, cos, p):
    """``d loss / d s`` (R, D) in the student's dtype."""
    R, D = s.shape
    ds = torch.empty_like(s)
    cfg = _config(D, s.dtype)
    if R:
        _angular_backward_kernel[(triton.cdiv(R, cfg["BLOCK_R"]),)](
            s, t, g, ns, nt, cos, ds, R, D, s.stride(0), t.stride(0), float(p), ACC_DTYPE=_acc(s.dtype), **cfg,
            **LAUNCH_OPTIONS,
        )
    return ds
