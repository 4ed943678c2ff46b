"""Every rule for choosing a backend, in one place.

Backends: ``"triton"`` (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``), ``"cuda"`` (the CUDA C++
kernels of ``csrc/``), ``"torch"`` (the fused algorithm chunked in torch: the CPU default),
``"reference"`` (the eager oracle of :mod:`mdkernels.reference`, which materialises ``B x C``) and
``"auto"``. Which op has kernels in which backend is the registry's (:data:`mdkernels.ops.OPS`).

``"auto"`` on a GPU: Triton, or the CUDA C++ kernels where they were measured faster.
:mod:`mdkernels.dispatch_table` holds rows ``{op, device, dtype, B, C, D, ms_triton, ms_cuda}`` (fwd+bwd
medians of one benchmark run; ``python -m bench.tune_dispatch`` writes them). For a call, the rows of the
same op, GPU name and dtype are candidates; the one nearest in (log B, log C, log D) decides, and "cuda"
wins only where it was measured faster. No matching row (another GPU, no measurements yet, the CUDA
module not built for this GPU): Triton.
"""

from __future__ import annotations

import functools
import math

import torch

from mdkernels import _cuda_ext
from mdkernels.ops import OPS, kernel_op
from mdkernels.ops._common.env import HAS_TRITON, interpreting

BACKENDS = ("auto", "triton", "cuda", "torch", "reference")


def choose(op: str, device_name: str, dtype: torch.dtype, B: int, C: int, D: int, rows: list[dict]) -> str | None:
    """The measured winner ("cuda" or "triton") of the nearest row, or None without a matching row."""
    name = str(dtype).removeprefix("torch.")
    candidates = [r for r in rows if r["op"] == op and r["device"] == device_name and r["dtype"] == name]
    if not candidates:
        return None

    def distance(r: dict) -> float:
        return sum(abs(math.log(max(a, 1)) - math.log(max(b, 1))) for a, b in ((B, r["B"]), (C, r["C"]), (D, r["D"])))

    best = min(candidates, key=distance)
    return "cuda" if best["ms_cuda"] < best["ms_triton"] else "triton"


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def gpu_backend(op: str, t: torch.Tensor, B: int, C: int, D: int) -> str:
    """``"cuda"`` where the table says the CUDA kernels were faster for this GPU, dtype and shape (and the
    module can run here), else ``"triton"``."""
    from mdkernels.dispatch_table import ROWS

    op = kernel_op(op)
    if not ROWS or "cuda" not in OPS[op].backends or not _cuda_ext.usable(t):
        return "triton"
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return choose(op, _device_name(index), t.dtype, B, C, D, ROWS) or "triton"


def require(op: str, backend: str, t: torch.Tensor) -> None:
    """Raise unless ``backend`` has kernels for ``op`` that can run on tensor ``t``: never a silent fallback."""
    if backend == "cuda" and "cuda" not in OPS[op].backends:
        covered = [OPS[name].functions[0] for name in OPS if "cuda" in OPS[name].backends and name != "l2norm"]
        raise ValueError(
            f"backend='cuda' has no kernel for {OPS[op].functions[0]}: the CUDA C++ backend covers "
            f"{', '.join(covered)}; use backend='triton' or 'auto'"
        )
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        if not t.is_cuda and not interpreting():
            raise ValueError(
                "backend='triton' runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 is set "
                "before importing mdkernels; use backend='torch' on the CPU"
            )
    elif backend == "cuda":
        if t.dtype == torch.float64 or not _cuda_ext.usable(t):
            raise ValueError(
                "backend='cuda' needs CUDA fp32/bf16/fp16 tensors and the CUDA module built for this GPU "
                "(mdkernels.info()['cuda_extension'])"
            )
    elif backend != "torch":
        raise ValueError(f"unknown fused backend {backend!r}")


def resolve(op: str, backend: str, t: torch.Tensor, shape: tuple[int, int, int] = (0, 0, 0)) -> str:
    """The concrete backend for ``op`` on tensor ``t``, checked with :func:`require` ("reference" passes).

    ``"auto"``: on CPU the chunked torch path; on CUDA Triton, or the CUDA C++ kernels where the op has
    them and they were measured faster on this GPU for the dtype and the nearest ``shape`` (B, C, D).
    Every backend is deterministic (no atomics: each output tile is written by one program), so
    ``torch.use_deterministic_algorithms`` changes nothing here.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if t.is_cuda and HAS_TRITON:
            backend = gpu_backend(op, t, *shape)
        else:
            backend = "torch"
    if backend != "reference":
        require(op, backend, t)
    return backend
