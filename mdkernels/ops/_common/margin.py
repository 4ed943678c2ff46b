"""The margin function on target cosines, with its derivative in closed form.

The margin touches one logit per row, so every fused backend computes it here, on ``(B,)`` vectors in
torch (O(B) work, any margin family, no ``acos`` inside a kernel), and the kernels only ever see
``s * cos`` for non-target classes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from mdkernels._math import THETA_CLAMP, compute_dtype
from mdkernels._validate import value_check
from mdkernels.ops.l2norm import row_rnorm


def margin_target_and_slope(
    cos_t: torch.Tensor,
    m2: torch.Tensor,
    *,
    s: float,
    m1: float,
    m3: torch.Tensor | float,
    fallback: bool,
    grad: str,
    easy_margin: bool = False,
    theta_clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Target logits ``z_t = s*g(c)``, ``dz_t/dc`` and ``dz_t/dm2`` for target cosines ``cos_t: (B,)``
    (already clamped). ``m2``, ``m3``: ``(B,)`` per-row margins (or a float ``m3``).

    ``g(c) = cos(phi) - m3`` with ``phi = m1*acos(c) + m2``, clipped to ``[theta_clip, pi - theta_clip]``
    when given (AdaFace; no gradient where the clip is active). Slope ``s*m1*sin(phi)/sin(theta)`` with
    theta from c clamped to ``[-1 + 1e-7, 1 - 1e-7]`` (``grad="exact"``), ``dz/dm2 = -s*sin(phi)``; or ``s``
    and 0 (straight-through: the margin carries no gradient). ``fallback`` (m1 == 1 only): where
    ``c < cos(pi - m2)``, ``g = c - m2*sin(m2) - m3`` (slope s, ``dz/dm2 = -s*(sin m2 + m2 cos m2)``).
    ``easy_margin`` (MagFace): where ``c <= 0``, ``g = c - m3`` (slope s, no margin gradient).
    """
    exact = grad != "straight_through"
    theta = torch.acos(cos_t)
    phi = m1 * theta + m2
    clipped = None
    if theta_clip is not None:
        clipped = (phi < theta_clip) | (phi > math.pi - theta_clip)
        phi = phi.clamp(theta_clip, math.pi - theta_clip)
    g = torch.cos(phi) - m3
    if exact:
        theta_d = torch.acos(cos_t.clamp(-1 + THETA_CLAMP, 1 - THETA_CLAMP))
        phi_d = m1 * theta_d + m2
        if theta_clip is not None:
            phi_d = phi_d.clamp(theta_clip, math.pi - theta_clip)
        slope = s * m1 * torch.sin(phi_d) / torch.sin(theta_d)
        dm2 = -s * torch.sin(phi_d)
        if clipped is not None:
            slope = torch.where(clipped, torch.zeros_like(slope), slope)
            dm2 = torch.where(clipped, torch.zeros_like(dm2), dm2)
    else:
        slope = torch.full_like(cos_t, s)
        dm2 = torch.zeros_like(cos_t)
    if fallback and m1 == 1.0:
        use = cos_t < torch.cos(math.pi - m2)
        g = torch.where(use, cos_t - m2 * torch.sin(m2) - m3, g)
        slope = torch.where(use, torch.full_like(slope, s), slope)
        if exact:
            dm2 = torch.where(use, -s * (torch.sin(m2) + m2 * torch.cos(m2)), dm2)
    if easy_margin:
        use = cos_t <= 0
        g = torch.where(use, cos_t - m3, g)
        slope = torch.where(use, torch.full_like(slope, s), slope)
        dm2 = torch.where(use, torch.zeros_like(dm2), dm2)
    return s * g, slope, dm2


def curricular_threshold(cos_t: torch.Tensor, m2: torch.Tensor, *, m1: float, m3) -> torch.Tensor:
    """CurricularFace's per-row threshold ``phi_i = cos(m1*theta_y + m2) - m3``: the margined target cosine
    before any fallback, which the official code compares the non-target cosines against."""
    return torch.cos(m1 * torch.acos(cos_t) + m2) - m3


def distillation_margins(
    teacher_cos: torch.Tensor, valid: torch.Tensor, *, m_min: float, m_max: float, dmax: str | float
) -> torch.Tensor:
    """MarginDistillation's per-row margins ``(m_max - m_min)/Dmax * cT + m_min`` (no gradient), ``(B,)``.

    ``dmax``: ``"batch"`` (the largest valid ``cT``), ``"global"`` (the same over every rank), a float, or a
    0-d tensor (the sharded head's global max). A measured Dmax stays on the device: no host sync. Dmax <= 0 is
    an error (at once on the CPU; on a GPU at the next call, :func:`mdkernels._validate.value_check`).
    """
    if isinstance(dmax, str):
        if dmax not in ("batch", "global"):
            raise ValueError(f"dmax must be 'batch', 'global' or a positive float, got {dmax!r}")
        largest = teacher_cos.detach().masked_fill(~valid, -math.inf).amax()
        if dmax == "global" and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(largest, op=torch.distributed.ReduceOp.MAX)
        dmax = largest
    if isinstance(dmax, torch.Tensor):
        none = dmax == -math.inf  # no valid row anywhere: the margins are never used
        value_check((dmax <= 0) & ~none, "MarginDistillation needs Dmax > 0 (the largest teacher cosine to its own "
                    "center): the teacher does not separate this batch; check teacher_centers/teacher embeddings, or "
                    "pass dmax=<float>")  # fmt: skip
        d = torch.where(dmax > 0, dmax, torch.ones_like(dmax))
        margins = teacher_cos.detach() * ((m_max - m_min) / d) + m_min
        return torch.where(none, torch.full_like(margins, m_min), margins)
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
    dot = (teacher_embeddings.to(cd) * w_y.to(cd)).sum(1)  # elementwise: never TF32
    return torch.where(valid, dot * row_rnorm(teacher_embeddings) * row_rnorm(w_y), torch.zeros_like(dot))


class NonTarget(NamedTuple):
    """How the kernels turn a class's cosine into its non-target logit (every field but ``tau`` and
    ``cos_clamp`` is off by default; the modern margin family turns them on):

    ``tau``: insightface's filter (cosines above tau count as 0, no gradient), or None. ``cos_clamp``: every
    cosine is clamped to ``[-cos_clamp, cos_clamp]``, no gradient outside (1; AdaFace 1 - 1e-3). ``t`` and
    ``phi``: CurricularFace's modulation, ``c (t + c)`` where ``c > phi_i`` (``t``: a 0-d tensor without
    gradient; ``phi``: ``(B,)``), or None. ``K``: sub-centers per class (weight rows ``c*K + k``; a class's
    cosine is the max over its K rows, the gradient goes to the argmax). ``kt``: ``(B,)`` the target's
    sub-center (int64), when ``K > 1``."""

    tau: float | None = None
    cos_clamp: float = 1.0
    t: torch.Tensor | None = None
    phi: torch.Tensor | None = None
    K: int = 1
    kt: torch.Tensor | None = None

    @property
    def plain(self) -> bool:
        """Nothing beyond the clamp to [-1, 1] and the filter: the path every backend has."""
        return self.cos_clamp == 1.0 and self.t is None and self.K == 1


def elastic_margins(cos_t: torch.Tensor, valid: torch.Tensor, m: float, std: float, *, plus: bool, order: str,
                    generator: torch.Generator | None) -> torch.Tensor:  # fmt: skip
    """ElasticFace's per-row margins ``N(m, std)``: one draw per row of the batch, in batch order (0 on ignored
    rows), without a host sync. A CPU ``generator`` draws on the CPU (reproducible on any device) and the draws
    go to the device without waiting; no generator: the device's RNG. ``plus`` sorts the valid rows' draws
    against their target cosines: ``order="paper"`` gives the largest cosine the smallest margin, ``"official"``
    reproduces utils/losses.py's ``sorted_margins[argsort(cos, descending)]``. As
    :func:`mdkernels.reference.elastic_margins` (the named deviation: the official code draws only for labelled
    rows; with no ignored row the two agree draw for draw)."""
    B = cos_t.shape[0]
    if generator is not None and generator.device.type == "cpu":
        draws = torch.normal(m, std, size=(B,), generator=generator)
        if cos_t.is_cuda:
            draws = draws.pin_memory()
        draws = draws.to(cos_t.device, cos_t.dtype, non_blocking=True)
    else:
        draws = torch.normal(m, std, size=(B,), generator=generator, device=cos_t.device).to(cos_t.dtype)
    if plus and B:
        ascending = torch.sort(torch.where(valid, draws, torch.full_like(draws, math.inf))).values  # valid first
        by_cosine = torch.argsort(torch.where(valid, cos_t.detach(), torch.full_like(draws, -math.inf)),
                                  descending=True, stable=True)  # valid rows first, by descending cosine
        if order == "official":  # the k-th valid row (batch order) takes ascending[subset index of its k-th]
            rank = torch.cumsum(valid.long(), 0) - 1  # each valid row's index among the valid rows
            draws = ascending[rank[by_cosine][rank.clamp_min(0)]]
        else:  # the row of the k-th largest cosine takes the k-th smallest draw
            draws = torch.empty_like(draws).scatter_(0, by_cosine, ascending)
    return torch.where(valid, draws, torch.zeros_like(draws))
