"""The margin function on target cosines, with its derivative in closed form.

The margin touches one logit per row, so every fused backend computes it here, on ``(B,)`` vectors in
torch (O(B) work, any margin family, no ``acos`` inside a kernel), and the kernels only ever see
``s * cos`` for non-target classes.
"""

from __future__ import annotations

import math
import warnings

import torch

THETA_CLAMP = 1e-7


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
