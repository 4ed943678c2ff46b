"""Public functions of mdkernels: validate on the host, pick a backend, call the fused op.

Backends: ``"triton"`` (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``), ``"torch"`` (the
fused algorithm chunked over classes in torch: the CPU default), ``"reference"`` (the eager oracle of
:mod:`mdkernels.reference`, which materialises ``B x C``) and ``"auto"``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from mdkernels import _validate as V
from mdkernels import reference
from mdkernels.ops import margin_ce as _mce
from mdkernels.ops.l2norm import l2_normalize
from mdkernels.ops.margin import warn_if_non_monotone

BACKENDS = ("auto", "triton", "torch", "reference")


class MarginCEStats(NamedTuple):
    """Per-row statistics of a margin cross-entropy call, all ``(B,)``, no gradient.

    lse: logsumexp over classes of the margin logits; cos_target: clamped cosine to the row's own
    center; loss_rows: per-row loss (0 for ignored rows).
    """

    lse: torch.Tensor
    cos_target: torch.Tensor
    loss_rows: torch.Tensor


def resolve_backend(backend: str, t: torch.Tensor) -> str:
    """The concrete backend ``"auto"`` means for tensor ``t`` (CUDA: triton; CPU: chunked torch)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if t.is_cuda and _mce.HAS_TRITON and not torch.are_deterministic_algorithms_enabled():
        return "triton"  # the Triton backward accumulates with atomics: not bitwise deterministic
    return "torch"


def _reduce(loss_rows: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return loss_rows
    if reduction == "sum":
        return loss_rows.sum()
    n_valid = (labels != ignore_index).sum().clamp_min(1)
    return loss_rows.sum() / n_valid.to(loss_rows.dtype)


def margin_cross_entropy(
    embeddings: torch.Tensor,
    centers: torch.Tensor,
    labels: torch.Tensor,
    *,
    s: float = 64.0,
    m1: float = 1.0,
    m2: float | torch.Tensor = 0.5,
    m3: float = 0.0,
    fallback: bool = True,
    grad: str = "exact",
    interclass_filter: float | None = None,
    ignore_index: int = -1,
    reduction: str = "mean",
    backend: str = "auto",
    return_stats: bool = False,
    check_finite: bool = False,
):
    """Margin-based softmax cross-entropy (ArcFace / CosFace / SphereFace / combined), fused.

    embeddings: (B, D) student features (any scale: they are normalised here).
    centers: (C, D) class centers (insightface's ``weight`` layout); frozen centers skip their GEMM.
    labels: (B,) int64 in [0, C), or ``ignore_index`` for rows that do not count.
    Target logit ``s*(cos(m1*theta + m2) - m3)``, others ``s*cos``. ``m2`` may be a (B,) tensor.
    ``grad="straight_through"`` passes ``s`` as the target derivative (insightface arcface_torch).
    Returns the loss (float32; float64 for float64 inputs); with ``return_stats=True`` also
    :class:`MarginCEStats`. No ``B x C`` tensor is allocated by the triton and torch backends.
    """
    V.check_margin_ce_args(embeddings, centers, labels, s=s, m2=m2, grad=grad, reduction=reduction)
    if centers.shape[0] == 0:
        raise ValueError("centers must have at least one row (class)")
    if check_finite:
        V.check_finite(embeddings, "embeddings")
        V.check_finite(centers, "centers")
    if not isinstance(m2, torch.Tensor):
        warn_if_non_monotone(m1, float(m2), fallback)
    backend = resolve_backend(backend, embeddings)
    tau = None if interclass_filter is None else float(interclass_filter)
    if backend == "reference":
        if return_stats:
            raise ValueError("return_stats needs a fused backend ('triton' or 'torch'), not 'reference'")
        return reference.margin_cross_entropy(
            embeddings,
            centers,
            labels,
            s=s,
            m1=m1,
            m2=m2,
            m3=m3,
            fallback=fallback,
            grad=grad,
            interclass_filter=tau,
            ignore_index=ignore_index,
            reduction=reduction,
        )
    cd = _mce.compute_dtype(embeddings)
    if isinstance(m2, torch.Tensor):
        m2_rows = m2.detach().to(cd)
    else:
        m2_rows = torch.full((embeddings.shape[0],), float(m2), dtype=cd, device=embeddings.device)
    loss_rows, lse, cos_t, _, _ = _mce.margin_ce_forward(
        embeddings,
        centers,
        labels,
        m2_rows,
        float(s),
        float(m1),
        float(m3),
        bool(fallback),
        grad,
        tau,
        int(ignore_index),
        backend,
    )
    loss = _reduce(loss_rows, labels, ignore_index, reduction)
    if return_stats:
        return loss, MarginCEStats(lse, cos_t, loss_rows.detach())
    return loss


__all__ = ["MarginCEStats", "l2_normalize", "margin_cross_entropy", "resolve_backend"]
