"""The margin function on target cosines, with its derivative in closed form.

The margin touches one logit per row, so every fused backend computes it here, on ``(B,)`` vectors in
torch (O(B) work, any margin family, no ``acos`` inside a kernel), and the kernels only ever see
``s * cos`` for non-target classes.
"""

from __future__ import annotations

import math
import warnings

import torch

from mdkernels._spec import THETA_CLAMP, compute_dtype
from mdkernels.ops.l2norm import row_rnorm


def margin_target_and_slope(
    cos_t: torch.Tensor,
    m2: torch.Tensor,
    *,
    s: float,
    m1: float,
    m3: float,
    fallback: bool,
    grad: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target logits ``z_t = s*g(c)`` and ``dz_t/dc`` for target cosines ``cos_t: (B,)`` (already clamped).

    ``g(c) = cos(m1*acos(c) + m2) - m3``; slope ``s*m1*sin(m1*theta + m2)/sin(theta)`` with theta from c
    clamped to ``[-1 + 1e-7, 1 - 1e-7]`` (``grad="exact"``), or ``s`` (straight-through, the fallback
    branch). ``m2: (B,)`` per-row margins, no gradient.
    """
    theta = torch.acos(cos_t)
    g = torch.cos(m1 * theta + m2) - m3
    if grad == "straight_through":
        slope = torch.full_like(cos_t, s)
    else:
        theta_d = torch.acos(cos_t.clamp(-1 + THETA_CLAMP, 1 - THETA_CLAMP))
        slope = s * m1 * torch.sin(m1 * theta_d + m2) / torch.sin(theta_d)
    if fallback and m1 == 1.0:
        use_fallback = cos_t < torch.cos(math.pi - m2)
        g = torch.where(use_fallback, cos_t - m2 * torch.sin(m2) - m3, g)
        slope = torch.where(use_fallback, torch.full_like(slope, s), slope)
    return s * g, slope


def warn_if_non_monotone(m1: float, m2: float, fallback: bool) -> None:
    """Warn when the target logit can increase with the angle (margin past pi and no fallback).

    Only for scalar margins; per-row margins (MarginDistillation) document their own behaviour.
    """
    if not (fallback and m1 == 1.0) and (m1 > 1.0 or m2 > 0.0):
        warnings.warn(
            f"margin (m1={m1}, m2={m2:g}) without the monotonic fallback: the target logit is not monotone "
            "in the angle for theta > (pi - m2)/m1; pass fallback=True (m1 == 1 only) to avoid it",
            stacklevel=3,
        )


def distillation_margins(
    teacher_cos: torch.Tensor, valid: torch.Tensor, *, m_min: float, m_max: float, dmax: str | float
) -> torch.Tensor:
    """MarginDistillation's per-row margins ``(m_max - m_min)/Dmax * cT + m_min`` (no gradient), ``(B,)``.

    ``dmax``: ``"batch"`` (the largest valid ``cT``), ``"global"`` (the same over every rank) or a float.
    """
    if isinstance(dmax, str):
        if dmax not in ("batch", "global"):
            raise ValueError(f"dmax must be 'batch', 'global' or a positive float, got {dmax!r}")
        largest = teacher_cos.detach().masked_fill(~valid, -math.inf).amax()
        if dmax == "global" and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(largest, op=torch.distributed.ReduceOp.MAX)
        dmax = float(largest)
        if dmax == -math.inf:  # no valid row anywhere: the margins are never used
            return torch.full_like(teacher_cos, m_min)
    if not dmax > 0:
        raise ValueError(
            f"MarginDistillation needs Dmax > 0 (the largest teacher cosine to its own center), got {dmax}: "
            "the teacher does not separate this batch; check teacher_centers/teacher embeddings, or pass dmax=<float>"
        )
    return teacher_cos.detach() * ((m_max - m_min) / dmax) + m_min


@torch.no_grad()
def teacher_target_cosine(
    teacher_embeddings: torch.Tensor, teacher_centers: torch.Tensor, labels: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """``cT_i = <n(t_i), n(W_T[y_i])>`` for every row ``(B,)`` (0 for ignored rows), without gradient: a
    gathered dot product, O(B*D), whatever C."""
    valid = labels != ignore_index
    w_y = teacher_centers[torch.where(valid, labels, torch.zeros_like(labels)).long()]
    cd = compute_dtype(teacher_embeddings)
    dot = torch.bmm(teacher_embeddings.to(cd).unsqueeze(1), w_y.to(cd).unsqueeze(2)).view(-1)
    return torch.where(valid, dot * row_rnorm(teacher_embeddings) * row_rnorm(w_y), torch.zeros_like(dot))
