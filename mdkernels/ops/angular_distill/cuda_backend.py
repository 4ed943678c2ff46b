"""CUDA C++ backend of angular distillation (csrc/angular_distill.cu): the same row kernels."""

from __future__ import annotations

import torch

from mdkernels import _cuda_ext
from mdkernels._math import compute_dtype


def forward(s, t, p):
    """Row losses and the statistics ``(|s|, |t|, cos)``, all ``(R,)``."""
    R, D = s.shape
    cd = compute_dtype(s)
    loss, ns, nt, cos = (torch.empty(R, dtype=cd, device=s.device) for _ in range(4))
    _cuda_ext.call("angular_forward", s, _cuda_ext.dtype_code(s), s.data_ptr(), t.data_ptr(), loss.data_ptr(),
                   ns.data_ptr(), nt.data_ptr(), cos.data_ptr(), R, D, s.stride(0), t.stride(0), float(p))  # fmt: skip
    return loss, ns, nt, cos


def backward(g, s, t, ns, nt, cos, p):
    """``d loss / d s`` (R, D) in the student's dtype."""
    R, D = s.shape
    ds = torch.empty_like(s)
    _cuda_ext.call("angular_backward", s, _cuda_ext.dtype_code(s), s.data_ptr(), t.data_ptr(), g.data_ptr(),
                   ns.data_ptr(), nt.data_ptr(), cos.data_ptr(), ds.data_ptr(), R, D, s.stride(0), t.stride(0),
                   float(p))  # fmt: skip
    return ds
