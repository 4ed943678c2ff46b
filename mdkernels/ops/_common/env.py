"""Where the kernels run: Triton's presence, the interpreter, pointer types for the compile check, SMs."""

from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # CPU-only installs may not have Triton
    HAS_TRITON = False

NEG_BIG = -1e30  # finite "minus infinity" for running maxima: keeps exp(m_old - m_new) free of NaN

_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64"}


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``, set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_runs(t: torch.Tensor) -> bool:
    """True when a Triton kernel can run on ``t``: a CUDA tensor, or a CPU tensor under the interpreter."""
    return HAS_TRITON and (t.is_cuda or interpreting())


def ptr(dtype: torch.dtype) -> str:
    """Triton's signature string of a pointer to ``dtype`` (``"*bf16"``...), for compiling without a GPU."""
    return _PTR[dtype]


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (1 off the GPU): sizes the split-C grids."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1
