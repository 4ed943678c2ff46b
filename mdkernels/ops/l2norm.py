"""Row-wise L2 normalisation ``y = x / max(||x||, eps)`` as a torch.library op.

``l2_normalize`` runs the CUDA C++ kernels of ``csrc/l2norm.cu`` on CUDA tensors when the module can run
here (one read of each input, fp32 accumulation); elsewhere the same math in torch, chunked over rows so
that normalising a ``[C, D]`` center matrix never needs more than a few MB of temporaries. The margin ops'
row norms (:func:`row_rnorm`, :func:`normalize_backward`) use the CUDA kernels only for ``backend="cuda"``
(``use_cuda``): the Triton path never depends on the CUDA module or its driver.
"""

from __future__ import annotations

import torch

from mdkernels import _cuda_ext
from mdkernels._math import EPS, compute_dtype
from mdkernels._validate import FLOAT_DTYPES

_ROW_CHUNK = 8192  # rows per torch chunk: bounds temporaries to ~8192*D fp32 elements


def row_rnorm(x: torch.Tensor, eps: float = EPS, use_cuda: bool = False) -> torch.Tensor:
    """``1 / max(||x_r||, eps)`` per row of ``x: (R, D)`` (any strides) in fp32 (fp64 for fp64 input): shape
    (R,). ``use_cuda``: the CUDA row kernel (``backend="cuda"``), where it can run and the columns are unit-stride."""
    cd = compute_dtype(x)
    out = torch.empty(x.shape[0], dtype=cd, device=x.device)
    if use_cuda and _cuda_ext.usable(x) and x.stride(1) == 1:
        _cuda_ext.call("l2norm_forward", x, _cuda_ext.dtype_code(x), x.data_ptr(), 0, out.data_ptr(), x.shape[0],
                       x.shape[1], x.stride(0), 0, eps)  # fmt: skip
        return out
    for r0 in range(0, x.shape[0], _ROW_CHUNK):
        chunk = x[r0 : r0 + _ROW_CHUNK]
        out[r0 : r0 + _ROW_CHUNK] = torch.linalg.vector_norm(chunk.to(cd), dim=1).clamp_min(eps).reciprocal()
    return out


def normalize_backward(
    x: torch.Tensor, dy: torch.Tensor, out: torch.Tensor | None = None, eps: float = EPS, use_cuda: bool = False
) -> torch.Tensor:
    """Gradient of ``n(x)`` rows: ``(dy - y<y, dy>)/max(||x||, eps)`` (``dy/eps`` where ``||x|| < eps``).

    x: (R, D); dy: (R, D) in fp32/fp64 or x's dtype; the result has x's dtype and layout (the gradient of a
    strided view has its strides). ``out`` may be ``dy`` itself (in place) when the dtypes agree.
    ``use_cuda``: the CUDA row kernel (``backend="cuda"``), where it can run.
    """
    if out is None:
        out = torch.empty_like(x)
    if (
        use_cuda
        and _cuda_ext.usable(x, out, dy)
        and dy.dtype in (torch.float32, x.dtype)
        and (x.stride(1) == 1 and dy.stride(1) == 1 and out.stride(1) == 1)
    ):
        _cuda_ext.call("l2norm_backward", x, _cuda_ext.dtype_code(x), dy.dtype == torch.float32 and
                       x.dtype != torch.float32, x.data_ptr(), dy.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1],
                       x.stride(0), dy.stride(0), out.stride(0), eps)  # fmt: skip
        return out
    cd = compute_dtype(x)
    for r0 in range(0, x.shape[0], _ROW_CHUNK):
        xc = x[r0 : r0 + _ROW_CHUNK].to(cd)
        gc = dy[r0 : r0 + _ROW_CHUNK].to(cd)
        oc = out[r0 : r0 + _ROW_CHUNK]
        norm = torch.linalg.vector_norm(xc, dim=1, keepdim=True)
        inv = norm.clamp_min(eps).reciprocal()
        dot = (xc * gc).sum(1, keepdim=True)  # <x, dy>: elementwise, never TF32 (a bmm would follow torch's flags)
        proj = torch.where(norm < eps, torch.zeros_like(norm), dot * inv * inv)
        if oc.dtype == cd:  # in place when out aliases dy: each element is read before it is written
            torch.addcmul(gc, xc, proj, value=-1.0, out=oc).mul_(inv)
        else:
            oc.copy_(torch.addcmul(gc, xc, proj, value=-1.0).mul_(inv))
    return out


@torch.library.custom_op("mdkernels::l2_normalize", mutates_args=())
def _l2_normalize_op(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    if _cuda_ext.usable(x):
        y = torch.empty_like(x)
        rn = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
        _cuda_ext.call("l2norm_forward", x, _cuda_ext.dtype_code(x), x.data_ptr(), y.data_ptr(), rn.data_ptr(),
                       x.shape[0], x.shape[1], x.stride(0), y.stride(0), eps)  # fmt: skip
        return y, rn
    rn = row_rnorm(x, eps)
    return (x.to(rn.dtype) * rn[:, None]).to(x.dtype), rn


@_l2_normalize_op.register_fake
def _(x, eps):
    return torch.empty_like(x), x.new_empty(x.shape[0], dtype=compute_dtype(x))


@torch.library.custom_op("mdkernels::l2_normalize_backward", mutates_args=())
def _l2_normalize_backward_op(x: torch.Tensor, dy: torch.Tensor, eps: float) -> torch.Tensor:
    return normalize_backward(x.contiguous(), dy.contiguous(), eps=eps, use_cuda=True)


@_l2_normalize_backward_op.register_fake
def _(x, dy, eps):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, eps = inputs
    ctx.save_for_backward(x)
    ctx.eps = eps
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y, grad_rnorm):
    (x,) = ctx.saved_tensors
    return _l2_normalize_backward_op(x, grad_y, ctx.eps), None


torch.library.register_autograd("mdkernels::l2_normalize", _backward, setup_context=_setup_context)


def l2_normalize(x: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """``x / max(||x||_2, eps)`` per row of ``x: (R, D)``; a drop-in for ``F.normalize(x, dim=1)``.

    Uses the CUDA C++ kernel for CUDA tensors when the module is built; differentiable; traceable by
    ``torch.compile(fullgraph=True)``.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor (rows, dim), got {getattr(x, 'shape', type(x))}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be a floating tensor (fp16/bf16/fp32/fp64), got {x.dtype}")
    return _l2_normalize_op(x, float(eps))[0]
