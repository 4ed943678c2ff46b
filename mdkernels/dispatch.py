"""How ``backend="auto"`` chooses between Triton and the CUDA C++ kernels on a GPU: from measurements.

:mod:`mdkernels.dispatch_table` holds rows ``{op, device, dtype, B, C, D, ms_triton, ms_cuda}`` (fwd+bwd
medians of one benchmark run; ``python -m bench.tune_dispatch`` writes them). For a call, the rows of
the same op, GPU name and dtype are candidates; the one nearest in (log B, log C, log D) decides, and
"cuda" wins only where it was measured faster. No matching row (another GPU, no measurements yet, the
CUDA module not built for this GPU): Triton.
"""

from __future__ import annotations

import functools
import math

import torch

OPS = ("margin_ce", "angular")


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
    from mdkernels import _cuda_ext
    from mdkernels.dispatch_table import ROWS

    if not ROWS or not _cuda_ext.usable(t):
        return "triton"
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return choose(op, _device_name(index), t.dtype, B, C, D, ROWS) or "triton"
