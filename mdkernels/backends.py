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

INTERPRETER = interpreting()  # TRITON_INTERPRET is read once, before Triton's kernels are decorated

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
    winner = _measured_winner(op, t, B, C, D, _active(options))
    return "cuda" if winner == "cuda" and _cuda_ext.cannot_run(kernel_op(op), t) is None else "triton"


def _measured_winner(op: str, t: torch.Tensor, B: int, C: int, D: int, on: list[str]) -> str:
    """The table's winner for this call ("cuda" or "triton"), before asking whether the CUDA module runs here."""
    from mdkernels.dispatch_table import ROWS

    kop = OPS[op].built_on or op
    if not ROWS or "cuda" not in OPS[kop].backends or any(n in dict(OPS[op].lacks).get("cuda", ()) for n in on):
        return "triton"
    if "strided_centers" in on:  # a (D, C) parameter's view: the CUDA kernels' loads of W would not coalesce
        return "triton"
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return choose(kop, _device_name(index), t.dtype, B, C, D, ROWS) or "triton"


def _active(options: dict) -> list[str]:
    """The options a call turns on: ``subcenters=3`` and ``curricular_t=True`` count; 1, None, False do not."""

    def on(value) -> bool:
        if value is None or isinstance(value, bool):
            return bool(value)
        return value != 1 if isinstance(value, int) else True

    return [name for name, value in options.items() if on(value)]


def _refusal(op: str, backend: str, t: torch.Tensor, on: list[str]) -> str | None:
    """Why ``backend`` cannot run ``op`` with the options ``on`` on tensor ``t``, from the registry and the tensor
    (the CUDA module's own limits are asked separately, once), or None."""
    on = [n for n in on if n != "strided_centers"]  # a preference of auto's, never a refusal
    spec = OPS[op]
    lacking = [name for name in on if name in dict(spec.lacks).get(backend, ())]
    if lacking:
        have = [b for b in spec.backends if not set(lacking) & set(dict(spec.lacks).get(b, ()))]
        return (f"backend={backend!r} has no kernel for {', '.join(lacking)} in {spec.functions[0]}; "
                f"use backend={have[0]!r} or 'auto' (kernels with it: {', '.join(have)})")  # fmt: skip
    if backend == "cuda" and "cuda" not in spec.backends:
        covered = [OPS[name].functions[0] for name in OPS if "cuda" in OPS[name].backends and name != "l2norm"]
        return (f"backend='cuda' has no kernel for {spec.functions[0]}: the CUDA C++ backend covers "
                f"{', '.join(covered)}; use backend='triton' or 'auto'")  # fmt: skip
    if backend == "triton" and not HAS_TRITON:
        return "backend='triton' needs the triton package (pip install triton)"
    if backend == "triton" and not t.is_cuda and not INTERPRETER:
        return ("backend='triton' runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 is set before "
                "importing mdkernels; use backend='torch' on the CPU")  # fmt: skip
    if backend not in ("triton", "cuda", "torch"):
        return f"unknown fused backend {backend!r}"
    return None


def require(op: str, backend: str, t: torch.Tensor, **options) -> None:
    """Raise unless ``backend`` has kernels for ``op`` (and for every option the call turns on, e.g.
    ``subcenters=3``) that can run on tensor ``t``: never a silent fallback."""
    why = _refusal(op, backend, t, _active(options))
    if why is None and backend == "cuda":
        why = _cuda_ext.cannot_run(kernel_op(op), t)
    if why is not None:
        raise (RuntimeError if "pip install" in why else ValueError)(why)


def resolve(op: str, backend: str, t: torch.Tensor, shape: tuple[int, int, int] = (0, 0, 0), **options) -> str:
    """The concrete backend for ``op`` on tensor ``t``, decided once: ``"auto"`` resolved, the choice checked
    against the registry and the tensor, then (for ``"cuda"``, chosen or measured faster) the CUDA module asked
    once whether it can run here. ``"reference"`` passes. Raises rather than fall back silently.

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
    if backend == "reference":
        return backend
    on = _active(options)
    measured = None
    if backend == "auto":
        measured = _measured_winner(op, t, *shape, on) if t.is_cuda and HAS_TRITON else "torch"
        backend = "triton" if measured == "cuda" else measured
        if measured == "cuda" and _refusal(op, "cuda", t, on) is not None:
            measured = "triton"
    why = _refusal(op, backend, t, on)
    if why is not None:
        raise (RuntimeError if "pip install" in why else ValueError)(why)
    if backend == "cuda" or measured == "cuda":  # the one question to the CUDA module
        cuda_why = _cuda_ext.cannot_run(OPS[op].built_on or op, t)
        if measured == "cuda":
            return "triton" if cuda_why else "cuda"
        if cuda_why is not None:
            raise ValueError(cuda_why)
    return backend
