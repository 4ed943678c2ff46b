"""The numeric constants of docs/math.md and its compute-dtype rule, shared by the oracle and every fused path.

One definition of each, so that :mod:`mdkernels.reference` and the kernels cannot drift apart.
"""

from __future__ import annotations

import torch

EPS = 1e-12  # n(v) = v / max(||v||, EPS), as F.normalize
THETA_CLAMP = 1e-7  # the exact margin derivative takes theta from c clamped to [-1 + 1e-7, 1 - 1e-7]


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """Every op accumulates in fp32 whatever the input dtype; fp64 inputs compute in fp64."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def margin_rows(m: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A margin as one value per row of ``like`` ``(B,)``, in its compute dtype; a tensor keeps its graph (a
    tensor ``m2`` that requires grad gets its gradient)."""
    cd = compute_dtype(like)
    if isinstance(m, torch.Tensor):
        return m.to(cd)
    return torch.full((like.shape[0],), float(m), dtype=cd, device=like.device)
