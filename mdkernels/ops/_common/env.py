"""Where the kernels run: Triton's presence, the interpreter, pointer types for the compile check, the
GPU's SMs and compute capability, and the options every Triton launch passes."""

from __future__ import annotations

import contextlib
import functools
import os

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # CPU-only installs may not have Triton
    HAS_TRITON = False

# Every Triton launch passes these. Fused multiply-add contraction on: fewer roundings, the numerics every
# Triton up to 3.9 defaulted to (3.10 turns it off by default) and that nvcc's --fmad=true gives the CUDA
# kernels. Set explicitly so that a Triton upgrade does not change mdkernels' results.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}

NEG_BIG = -1e30  # finite "minus infinity" for running maxima: keeps exp(m_old - m_new) free of NaN

_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float64: "*fp64"}


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``, set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def values_at_hand(t: torch.Tensor) -> bool:
    """True when reading ``t``'s values costs nothing: a CPU tensor (unless the tests make the CPU take the
    GPU's path, :data:`mdkernels._validate.DEFER_ON_CPU`). On a GPU a read is a host sync: the fused paths
    never make one in a training step."""
    from mdkernels import _validate

    return t.device.type == "cpu" and not _validate.DEFER_ON_CPU


def triton_runs(t: torch.Tensor) -> bool:
    """True when a Triton kernel can run on ``t``: a CUDA tensor, or a CPU tensor under the interpreter."""
    return HAS_TRITON and (t.is_cuda or interpreting())


def ptr(dtype: torch.dtype) -> str:
    """Triton's signature string of a pointer to ``dtype`` (``"*bf16"``...), for compiling without a GPU."""
    return _PTR[dtype]


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (1 off the GPU): sizes the split-C grids."""
    return _props(device.index if device.index is not None else torch.cuda.current_device())[0] if device.type == "cuda" else 1


def capability(device: torch.device) -> int | None:
    """The compute capability of a CUDA ``device`` as ``10 * major + minor`` (90 for an H100), None off the
    GPU: the Triton tile configurations depend on it (wgmma from sm_90 on)."""
    if device.type != "cuda":
        return None
    return _props(device.index if device.index is not None else torch.cuda.current_device())[1]


@functools.cache
def _props(index: int) -> tuple[int, int]:
    p = torch.cuda.get_device_properties(index)
    return p.multi_processor_count, 10 * p.major + p.minor


_OPERANDS = {"": None, "bfloat16": torch.bfloat16, "float16": torch.float16}  # as mdkernels._plan names them


def operand_dtype(name: str) -> torch.dtype | None:
    """The custom ops carry the dots' operand dtype as a string ("" = the inputs' own)."""
    return _OPERANDS[name]


@contextlib.contextmanager
def ieee_fp32_matmul(t: torch.Tensor):
    """The torch-side fp32 GEMMs of a fused call (the ``torch`` backend's chunks) in full fp32 on a GPU, whatever
    ``torch.backends.cuda.matmul.allow_tf32`` says: one precision policy for the fused paths (docs/design.md,
    "Precision"; Triton's fp32 dots are tf32x3). Restored on the way out."""
    if not (t.is_cuda and t.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32):
        yield
        return
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = True


def no_autocast(t: torch.Tensor):
    """The fused ops choose their own precision (``op_dtype``): autocast must not re-cast the torch ops inside."""
    import contextlib

    return torch.autocast(t.device.type, enabled=False) if t.device.type in ("cuda", "cpu") else contextlib.nullcontext()
