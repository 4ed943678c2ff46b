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


def gpu_backend(op: str, t: torch.Tensor, B: int, C: int, D: int, **options) -> str:
    """``"cuda"`` where the table says the CUDA kernels were faster for this GPU, dtype and shape (and the
    module can run here, with every option the call turns on), else ``"triton"``."""
    from mdkernels.dispatch_table import ROWS

    if any(name in OPS[op].lacking("cuda") for name in _active(options)):
        return "triton"
    op = kernel_op(op)
    if not ROWS or "cuda" not in OPS[op].backends or not _cuda_ext.usable(t):
        return "triton"
    if op == "margin_ce" and not _cuda_ext.margin_fits(t):
        return "triton"
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return choose(op, _device_name(index), t.dtype, B, C, D, ROWS) or "triton"


def _active(options: dict) -> list[str]:
    """The options a call turns on: ``subcenters=3`` and ``curricular_t=True`` count; 1, None, False do not."""

    def on(value) -> bool:
        if value is None or isinstance(value, bool):
            return bool(value)
        return value != 1 if isinstance(value, int) else True

    return [name for name, value in options.items() if on(value)]


def require(op: str, backend: str, t: torch.Tensor, **options) -> None:
    """Raise unless ``backend`` has kernels for ``op`` (and for every option the call turns on, e.g.
    ``subcenters=3``) that can run on tensor ``t``: never a silent fallback."""
    lacking = [name for name in _active(options) if name in OPS[op].lacking(backend)]
    if lacking:
        have = [b for b in OPS[op].backends if not set(lacking) & set(OPS[op].lacking(b))]
        raise ValueError(
            f"backend={backend!r} has no kernel for {', '.join(lacking)} in {OPS[op].functions[0]}; "
            f"use backend={have[0]!r} or 'auto' (kernels with it: {', '.join(have)})"
        )
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
            why = _cuda_ext.unusable_reason() if t.is_cuda and not _cuda_ext._EMULATING else None
            raise ValueError(
                "backend='cuda' needs CUDA fp32/bf16/fp16 tensors and the CUDA module built for this GPU "
                f"(mdkernels.info()['cuda_extension']){': the module is ' + why if why else ''}; use backend='triton'"
            )
        if kernel_op(op) == "margin_ce" and not _cuda_ext.margin_fits(t):
            props = torch.cuda.get_device_properties(t.device)
            raise ValueError(
                f"backend='cuda': the CUDA margin kernels need {_cuda_ext.margin_smem_need(t.dtype)} bytes of shared "
                f"memory per block for {t.dtype}, and {props.name} allows {props.shared_memory_per_block_optin} "
                "(shared_memory_per_block_optin); use backend='triton'"
            )
    elif backend != "torch":
        raise ValueError(f"unknown fused backend {backend!r}")


def resolve(op: str, backend: str, t: torch.Tensor, shape: tuple[int, int, int] = (0, 0, 0), **options) -> str:
    """The concrete backend for ``op`` on tensor ``t``, checked with :func:`require` ("reference" passes).

    ``"auto"``: on CPU the chunked torch path; on CUDA Triton, or the CUDA C++ kernels where the op has
    them (with every option in ``options``) and they were measured faster on this GPU for the dtype and the
    nearest ``shape`` (B, C, D).
    The choice is a rule of the device, the op, the dtype and the committed table, never a timing. Every
    backend gives the same bits for the same inputs (no floating-point atomics: each output tile is written by
    one program), and ``torch.use_deterministic_algorithms(True)`` changes nothing here (docs/design.md,
    "Reproducibility"; python_tests/test_determinism.py).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if t.is_cuda and HAS_TRITON:
            backend = gpu_backend(op, t, *shape, **options)
        else:
            backend = "torch"
    if backend != "reference":
        require(op, backend, t, **options)
    return backend
