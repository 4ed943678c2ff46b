"""Margin-softmax heads: modules that own the ``(C, D)`` center matrix and return the fused loss.

``ArcFace``/``CosFace``/``SphereFace``/``CombinedMargin`` use insightface's layout (``weight: (C, D)``).
``ArcFaceLoss``/``CosFaceLoss`` are drop-ins for pytorch-metric-learning's losses of the same names
(same constructor, ``W: (D, C)`` parameter, margin in degrees for ArcFace), and ``PartialFCHead`` stands
where insightface's ``PartialFC_V2(CombinedMarginLoss(...))`` stands on one GPU.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mdkernels.functional import margin_cross_entropy


class CombinedMargin(nn.Module):
    """Margin softmax head ``s*(cos(m1*theta + m2) - m3)`` on the target, ``s*cos`` elsewhere.

    Args:
        embedding_size: D. num_classes: C. s, m1, m2, m3: scale and margins (docs/math.md §1).
        fallback, grad, interclass_filter, ignore_index, reduction, backend: as
        :func:`mdkernels.margin_cross_entropy`.
    Shapes: ``forward(embeddings: (B, D), labels: (B,)) -> loss``. ``weight: (C, D)``, initialised
    ``N(0, 0.01)`` as insightface's heads.
    """

    centers_name = "weight"  # the trainable centers (mdkernels.fuse_center_update finds heads by it)

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.0,
        m3: float = 0.0,
        *,
        fallback: bool = True,
        grad: str = "exact",
        interclass_filter: float | None = None,
        ignore_index: int = -1,
        reduction: str = "mean",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if embedding_size <= 0 or num_classes <= 0:
            raise ValueError(f"embedding_size and num_classes must be positive, got {embedding_size}, {num_classes}")
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)
        self.fallback, self.grad, self.interclass_filter = fallback, grad, interclass_filter
        self.ignore_index, self.reduction, self.backend = ignore_index, reduction, backend
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (num_classes, embedding_size)))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return margin_cross_entropy(
            embeddings.to(self.weight.dtype) if embeddings.dtype != self.weight.dtype else embeddings,
            self.weight,
            labels,
            s=self.s,
            m1=self.m1,
            m2=self.m2,
            m3=self.m3,
            fallback=self.fallback,
            grad=self.grad,
            interclass_filter=self.interclass_filter,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, s={self.s}, "
            f"m1={self.m1}, m2={self.m2}, m3={self.m3}, grad={self.grad!r}, backend={self.backend!r}"
        )


class ArcFace(CombinedMargin):
    """ArcFace (additive angular margin): ``s*cos(theta + m)`` on the target; s=64, m=0.5."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.5, **kw) -> None:
        super().__init__(embedding_size, num_classes, s=s, m1=1.0, m2=m, m3=0.0, **kw)


class CosFace(CombinedMargin):
    """CosFace (additive cosine margin): ``s*(cos(theta) - m)`` on the target; s=64, m=0.35."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.35, **kw) -> None:
        super().__init__(embedding_size, num_classes, s=s, m1=1.0, m2=0.0, m3=m, **kw)


class SphereFace(CombinedMargin):
    """SphereFace, normalised (multiplicative angular margin): ``s*cos(m*theta)``; s=64, m=1.35.

    The target logit is not monotone for theta > pi/m (no fallback exists for m1 != 1): a warning
    says so once.
    """

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 1.35, **kw) -> None:
        super().__init__(embedding_size, num_classes, s=s, m1=m, m2=0.0, m3=0.0, **kw)


class _PMLMarginLoss(nn.Module):
    """pytorch-metric-learning's layout: ``W: (embedding_size, num_classes)``, mean over the batch."""

    centers_name = "W"

    def __init__(self, num_classes: int, embedding_size: int, scale: float, backend: str) -> None:
        super().__init__()
        self.num_classes, self.embedding_size, self.scale, self.backend = num_classes, embedding_size, scale, backend
        self.W = nn.Parameter(torch.empty(embedding_size, num_classes))
        nn.init.normal_(self.W)

    def _loss(self, embeddings, labels, **margins):
        # W.t() is a (C, D) view with strides (1, C): the Triton and torch kernels read it in place (no copy of the
        # centers), and the centers' gradient is written through the same strides.
        return margin_cross_entropy(embeddings, self.W.t(), labels, s=self.scale, backend=self.backend, **margins)


class ArcFaceLoss(_PMLMarginLoss):
    """Drop-in for ``pytorch_metric_learning.losses.ArcFaceLoss(num_classes, embedding_size, margin=28.6,
    scale=64)``: margin in degrees, the same monotonic fallback, the same numerics, fused."""

    def __init__(
        self, num_classes: int, embedding_size: int, margin: float = 28.6, scale: float = 64, backend: str = "auto"
    ) -> None:
        super().__init__(num_classes, embedding_size, scale, backend)
        self.margin = float(margin)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._loss(embeddings, labels, m2=math.radians(self.margin), fallback=True)


class CosFaceLoss(_PMLMarginLoss):
    """Drop-in for ``pytorch_metric_learning.losses.CosFaceLoss(num_classes, embedding_size, margin=0.35,
    scale=64)``, fused."""

    def __init__(
        self, num_classes: int, embedding_size: int, margin: float = 0.35, scale: float = 64, backend: str = "auto"
    ) -> None:
        super().__init__(num_classes, embedding_size, scale, backend)
        self.margin = float(margin)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._loss(embeddings, labels, m2=0.0, m3=self.margin)


class PartialFCHead(CombinedMargin):
    """Stands where insightface's ``PartialFC_V2(CombinedMarginLoss(s, m1, m2, m3, filter), D, C)`` does
    on one GPU: same ``weight: (C, D)`` (so its checkpoints load) and the same numerics as arcface_torch's
    ``CombinedMarginLoss``: for ``m1 == 1, m3 == 0`` the literal ``cos(theta + m2)`` with a
    straight-through gradient and no fallback; for ``m3 > 0`` CosFace; ``interclass_filtering_threshold
    > 0`` zeroes non-target cosines above it. Other combinations are rejected, as insightface rejects
    (or ignores) them: use :class:`CombinedMargin` for those. ``sample_rate`` < 1 (negative-class
    sampling) belongs to the sharded head; here only 1.0 is accepted.
    """

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        s: float = 64.0,
        m1: float = 1.0,
        m2: float = 0.5,
        m3: float = 0.0,
        interclass_filtering_threshold: float = 0.0,
        sample_rate: float = 1.0,
        **kw,
    ) -> None:
        if sample_rate != 1.0:
            raise ValueError("PartialFCHead supports sample_rate=1.0 only; negative sampling is sharded-head work")
        for k, v in insightface_margin_options(m1, m2, m3, interclass_filtering_threshold).items():
            kw.setdefault(k, v)
        super().__init__(embedding_size, num_classes, s=s, m1=m1, m2=m2, m3=m3, **kw)


def insightface_margin_options(m1: float, m2: float, m3: float, interclass_filtering_threshold: float = 0.0) -> dict:
    """The ``margin_cross_entropy`` options that reproduce arcface_torch's ``CombinedMarginLoss`` for
    ``(m1, m2, m3)``: ArcFace (``m1 == 1, m3 == 0``) as the literal ``cos(theta + m2)`` with a
    straight-through gradient and no fallback, CosFace (``m1 == 1, m2 == 0, m3 > 0``) exact; the filter
    on when the threshold is above 0. Other combinations raise, as insightface rejects them."""
    if m1 == 1.0 and m3 == 0.0:
        opts = {"grad": "straight_through", "fallback": False}
    elif m3 > 0 and m1 == 1.0 and m2 == 0.0:
        opts = {"grad": "exact"}
    else:
        raise ValueError(
            f"insightface's CombinedMarginLoss handles (m1=1, m3=0) or (m1=1, m2=0, m3>0), got "
            f"({m1}, {m2}, {m3}); use mdkernels.nn.CombinedMargin for combined margins"
        )
    opts["interclass_filter"] = interclass_filtering_threshold if interclass_filtering_threshold > 0 else None
    return opts
