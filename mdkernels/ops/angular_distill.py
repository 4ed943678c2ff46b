"""Angular distillation (ShrinkTeaNet, SPEC section 4): ``mean_i (1 - <n(s_i), n(t_i)>)^p``, fused.

One row kernel per direction: forward reads each student and teacher row once, accumulating
``|s|^2``, ``|t|^2`` and ``<s, t>`` in fp32, and writes the row loss plus three ``(R,)`` statistics;
backward reads both rows once more and writes ``ds``:

    d loss_i / d s_i = -p (1 - cos_i)^(p-1) * (t_i/|t_i| - cos_i s_i/|s_i|) / |s_i|

(``n(s) = s/eps`` is linear where ``|s| < eps``: then ``dcos/ds = n(t)/eps``). The teacher gets no
gradient. Backends: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``) and ``"torch"``.
"""

from __future__ import annotations

import torch

from mdkernels import _cuda_ext
from mdkernels._cuda_ext import on_device
from mdkernels.ops.margin_ce import HAS_TRITON, compute_dtype, interpreting

EPS = 1e-12

if HAS_TRITON:
    import triton
    import triton.language as tl

    _EPS = tl.constexpr(EPS)  # globals read inside @triton.jit must be constexpr

    @triton.jit
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

    @triton.jit
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


def _config(D: int) -> dict:
    block_d = min(1024 if interpreting() else 256, triton.next_power_of_2(max(D, 16)))
    return dict(BLOCK_R=64 if interpreting() else 8, BLOCK_D=block_d)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def compile_specs(dtype: torch.dtype, D: int = 512) -> list:
    """The row kernels as the GPU launcher compiles them (see :mod:`mdkernels.ops.gpu_compile`)."""
    from mdkernels.ops.gpu_compile import ptr

    acc = torch.float64 if dtype == torch.float64 else torch.float32
    cfg = _config(D)
    rows = {"R": "i32", "D": "i32", "stride_s": "i32", "stride_t": "i32", "p": "fp32"}
    fwd = {"S": ptr(dtype), "T": ptr(dtype), "LOSS": ptr(acc), "NS": ptr(acc), "NT": ptr(acc), "COS": ptr(acc), **rows}
    bwd = {"S": ptr(dtype), "T": ptr(dtype), "G": ptr(acc), "NS": ptr(acc), "NT": ptr(acc), "COS": ptr(acc),
           "DS": ptr(dtype), **rows}  # fmt: skip
    const = {**cfg, "ACC_DTYPE": _acc(dtype)}
    return [("angular_forward", _angular_forward_kernel, fwd, const, {}),
            ("angular_backward", _angular_backward_kernel, bwd, const, {})]  # fmt: skip


def _forward_torch(s, t, p):
    cd = compute_dtype(s)
    s32, t32 = s.to(cd), t.to(cd)
    ns, nt = torch.linalg.vector_norm(s32, dim=1), torch.linalg.vector_norm(t32, dim=1)
    cos = torch.bmm(s32.unsqueeze(1), t32.unsqueeze(2)).view(-1) / (ns.clamp_min(EPS) * nt.clamp_min(EPS))
    return (1 - cos).clamp_min(0).pow(p), ns, nt, cos


def _backward_torch(g, s, t, ns, nt, cos, p):
    cd = compute_dtype(s)
    gap = (1 - cos).clamp_min(0)
    if p == 1.0:
        dcos = -torch.ones_like(gap)
    else:
        dcos = torch.where(gap > 0, -p * gap.pow(p - 1), torch.zeros_like(gap))
    dcos = dcos * g
    rs, rt = ns.clamp_min(EPS).reciprocal(), nt.clamp_min(EPS).reciprocal()
    proj = torch.where(ns < EPS, torch.zeros_like(cos), cos * rs)
    ds = (t.to(cd) * rt[:, None]).sub_(s.to(cd) * proj[:, None]).mul_((dcos * rs)[:, None])
    return ds.to(s.dtype)


@torch.library.custom_op("mdkernels::angular_distill_forward", mutates_args=())
def angular_distill_forward(
    s: torch.Tensor, t: torch.Tensor, p: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row losses ``(1 - cos)^p`` and the statistics ``(|s|, |t|, cos)``, all ``(R,)``."""
    s, t = s.contiguous(), t.contiguous()
    if backend == "torch":
        return _forward_torch(s, t, p)
    R, D = s.shape
    cd = compute_dtype(s)
    loss, ns, nt, cos = (torch.empty(R, dtype=cd, device=s.device) for _ in range(4))
    if backend == "cuda":  # csrc/angular_distill.cu
        with on_device(s):
            _cuda_ext.ext.angular_forward(
                _cuda_ext.dtype_code(s),
                s.data_ptr(),
                t.data_ptr(),
                loss.data_ptr(),
                ns.data_ptr(),
                nt.data_ptr(),
                cos.data_ptr(),
                R,
                D,
                s.stride(0),
                t.stride(0),
                float(p),
                _cuda_ext.stream_of(s),
            )
        return loss, ns, nt, cos
    cfg = _config(D)
    if R:
        with on_device(s):
            _angular_forward_kernel[(triton.cdiv(R, cfg["BLOCK_R"]),)](
                s, t, loss, ns, nt, cos, R, D, s.stride(0), t.stride(0), float(p), ACC_DTYPE=_acc(s.dtype), **cfg
            )
    return loss, ns, nt, cos


@angular_distill_forward.register_fake
def _(s, t, p, backend):
    row = s.new_empty(s.shape[0], dtype=compute_dtype(s))
    return row, torch.empty_like(row), torch.empty_like(row), torch.empty_like(row)


@torch.library.custom_op("mdkernels::angular_distill_backward", mutates_args=())
def angular_distill_backward(
    g: torch.Tensor, s: torch.Tensor, t: torch.Tensor, ns: torch.Tensor, nt: torch.Tensor, cos: torch.Tensor,
    p: float, backend: str,
) -> torch.Tensor:  # fmt: skip
    s, t, g = s.contiguous(), t.contiguous(), g.contiguous().to(ns.dtype)
    if backend == "torch":
        return _backward_torch(g, s, t, ns, nt, cos, p)
    R, D = s.shape
    ds = torch.empty_like(s)
    if backend == "cuda":
        with on_device(s):
            _cuda_ext.ext.angular_backward(
                _cuda_ext.dtype_code(s),
                s.data_ptr(),
                t.data_ptr(),
                g.data_ptr(),
                ns.data_ptr(),
                nt.data_ptr(),
                cos.data_ptr(),
                ds.data_ptr(),
                R,
                D,
                s.stride(0),
                t.stride(0),
                float(p),
                _cuda_ext.stream_of(s),
            )
        return ds
    cfg = _config(D)
    if R:
        with on_device(s):
            _angular_backward_kernel[(triton.cdiv(R, cfg["BLOCK_R"]),)](
                s, t, g, ns, nt, cos, ds, R, D, s.stride(0), t.stride(0), float(p), ACC_DTYPE=_acc(s.dtype), **cfg
            )
    return ds


@angular_distill_backward.register_fake
def _(g, s, t, ns, nt, cos, p, backend):
    return torch.empty_like(s)


def _setup_context(ctx, inputs, output):
    s, t, p, backend = inputs
    _, ns, nt, cos = output
    ctx.save_for_backward(s, t, ns, nt, cos)
    ctx.args = (p, backend)
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, g, *_unused):
    s, t, ns, nt, cos = ctx.saved_tensors
    p, backend = ctx.args
    ds = angular_distill_backward(g, s, t, ns, nt, cos, p, backend) if ctx.needs_input_grad[0] else None
    return ds, None, None, None


torch.library.register_autograd("mdkernels::angular_distill_forward", _backward, setup_context=_setup_context)


def rows_of(x: torch.Tensor, per: str) -> torch.Tensor:
    """(R, K) rows compared by the loss: embeddings as they are; feature maps per sample (flattened) or
    per spatial position (channel vectors; a copy unless the map is channels_last)."""
    if x.dim() == 2:
        return x
    if x.dim() != 4:
        raise ValueError(f"angular distillation takes (B, D) embeddings or (B, C, H, W) maps, got {tuple(x.shape)}")
    if per == "sample":
        return x.reshape(x.shape[0], -1)
    if per == "position":
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    raise ValueError(f"per must be 'sample' or 'position', got {per!r}")
