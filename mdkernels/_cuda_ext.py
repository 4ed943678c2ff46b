"""Loads the optional CUDA C++ module (``mdkernels._cuda``) and converts tensors to its raw arguments."""

from __future__ import annotations

import torch

try:  # built by setup.py when nvcc was found (MDK_BUILD_CUDA=AUTO|ON)
    from mdkernels import _cuda as ext
except ImportError:  # pure-Python build, or a build for another Python
    ext = None

# Must match csrc/common.h::DType.
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def built() -> bool:
    """True when the CUDA module was compiled into this install."""
    return ext is not None


def usable(*tensors: torch.Tensor) -> bool:
    """True when the CUDA module can run on these tensors (built, CUDA tensors, a supported dtype)."""
    return ext is not None and all(t.is_cuda and t.dtype in _DTYPE_CODES for t in tensors)


def dtype_code(t: torch.Tensor) -> int:
    return _DTYPE_CODES[t.dtype]


def stream_of(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream
