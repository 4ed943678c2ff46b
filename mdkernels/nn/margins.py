"""The modern margin family as heads, every one on the fused margin CE (no ``B x C`` tensor).

Each module owns ``weight: (C, D)`` (``(C K, D)`` for sub-centers, row ``c*K + k``), initialised
``N(0, 0.01)`` as insightface's heads, and ``forward(embeddings: (B, D), labels: (B,)) -> loss``. The
embeddings are not normalised by the caller: their norms drive AdaFace and MagFace. Defaults are those of
the official training code; the README's family table lists each and every deviation. Rows labelled
``ignore_index`` are left out of the loss and of the batch statistics.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mdkernels._math import compute_dtype
from mdkernels.functional import margin_cross_entropy
from mdkernels.ops._common.margin import elastic_margins, teacher_target_cosine

ADAFACE_EPS = 1e-3  # head.py's cosine clamp, angle clip and std guard


def _check_range(name: str, value: float, lo: float, hi: float, what: str) -> None:
    if not (lo <= float(value) <= hi) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be in [{lo}, {hi}] ({what}), got {value}")


class _MarginHead(nn.Module):
    centers_name = "weight"  # the trainable centers (mdkernels.fuse_center_update finds heads by it)

    def __init__(self, embedding_size: int, num_classes: int, rows_per_class: int, s: float, backend: str,
                 ignore_index: int) -> None:  # fmt: skip
        super().__init__()
        if embedding_size <= 0 or num_classes <= 0:
            raise ValueError(f"embedding_size and num_classes must be positive, got {embedding_size}, {num_classes}")
        if not s > 0:
            raise ValueError(f"s (the logit scale) must be > 0, got {s}")
        self.embedding_size, self.num_classes = embedding_size, num_classes
        self.s, self.backend, self.ignore_index = float(s), backend, ignore_index
        self.weight = nn.Parameter(torch.normal(0.0, 0.01, (num_classes * rows_per_class, embedding_size)))

    def _loss(self, embeddings: torch.Tensor, labels: torch.Tensor, **margins) -> torch.Tensor:
        x = embeddings.to(self.weight.dtype) if embeddings.dtype != self.weight.dtype else embeddings
        return margin_cross_entropy(x, self.weight, labels, s=self.s, ignore_index=self.ignore_index,
                                    backend=self.backend, **margins)  # fmt: skip

    def _valid(self, labels: torch.Tensor) -> torch.Tensor:
        """The rows that count: labelled, and in range (a label out of range is the fused op's error to raise;
        here it only must not index the centers)."""
        return (labels != self.ignore_index) & (labels >= 0) & (labels < self.num_classes)

    def _safe(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels with every row that does not count at -1: safe to gather centers with."""
        return torch.where(self._valid(labels), labels, torch.full_like(labels, -1))


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean over the rows of mask, their count)``, both 0-d tensors: no host sync (a boolean index would be
    one). The mean is 0 when the count is."""
    m = mask.to(values.dtype)
    count = m.sum()
    return (values * m).sum() / count.clamp_min(1), count


class AdaFace(_MarginHead):
    """AdaFace (Kim et al., CVPR 2022), as mk-minchul/AdaFace ``head.py``: the margin adapts to the image
    quality, read from the feature norm.

    ``norm = clip(|x|, 0.001, 100)`` (detached); buffers ``batch_mean`` (20) and ``batch_std`` (100),
    EMA-updated before use in training mode (unbiased std, ``t_alpha``); ``z = clip(h (norm - mean)/(std +
    1e-3), -1, 1)``; target ``cos(clip(theta - m z, 1e-3, pi - 1e-3)) - m (1 + z)``; every cosine clamped to
    ``[-1 + 1e-3, 1 - 1e-3]``. ``t_alpha = 0.01`` is the training scripts' value (the class default in
    head.py is 1.0). Deviations: the buffers stay frozen in eval mode (the official head updates them on
    every call); a batch with one valid row updates the mean only (the official unbiased std is NaN
    there); ignored rows are left out of the statistics. ``grad="straight_through"``: the margin carries
    no gradient, as CVLface computes it."""

    def __init__(self, embedding_size: int, num_classes: int, m: float = 0.4, h: float = 0.333, s: float = 64.0,
                 t_alpha: float = 0.01, grad: str = "exact", *, ignore_index: int = -1,
                 backend: str = "auto") -> None:  # fmt: skip
        super().__init__(embedding_size, num_classes, 1, s, backend, ignore_index)
        _check_range("m", m, 0.0, math.pi / 2, "the margin, radians")
        _check_range("h", h, 0.0, 1e3, "the scale of the normalised norm; 0.333 in the paper")
        _check_range("t_alpha", t_alpha, 0.0, 1.0, "the EMA rate of the norm statistics")
        if grad not in ("exact", "straight_through"):
            raise ValueError(f"grad must be 'exact' or 'straight_through', got {grad!r}")
        self.m, self.h, self.t_alpha, self.grad = float(m), float(h), float(t_alpha), grad
        self.register_buffer("batch_mean", torch.full((1,), 20.0))
        self.register_buffer("batch_std", torch.full((1,), 100.0))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        norms = torch.linalg.vector_norm(embeddings.detach().to(compute_dtype(embeddings)), dim=1).clip(0.001, 100)
        if self.training:  # on the device: a batch with no valid row keeps both, with one the std
            with torch.no_grad():
                valid = self._valid(labels)
                mean_b, n = _masked_mean(norms, valid)
                var_b = ((norms - mean_b) ** 2 * valid.to(norms.dtype)).sum() / (n - 1).clamp_min(1)  # unbiased
                a = self.t_alpha
                self.batch_mean.copy_(torch.where(n >= 1, (1 - a) * self.batch_mean + a * mean_b.to(self.batch_mean),
                                                  self.batch_mean))  # fmt: skip
                self.batch_std.copy_(torch.where(n >= 2, (1 - a) * self.batch_std + a * var_b.sqrt().to(self.batch_std),
                                                 self.batch_std))  # fmt: skip
        mean, std = self.batch_mean.to(norms.dtype), self.batch_std.to(norms.dtype)
        z = ((norms - mean) / (std + ADAFACE_EPS) * self.h).clip(-1, 1)
        return self._loss(embeddings, labels, m2=-self.m * z, m3=self.m * (1 + z), fallback=False, grad=self.grad,
                          theta_clip=ADAFACE_EPS, cos_clamp=1 - ADAFACE_EPS)  # fmt: skip


class CurricularFace(_MarginHead):
    """CurricularFace (Huang et al., CVPR 2020), as HuangYG123/CurricularFace ``head/metrics.py``: ArcFace
    with the ``th``/``mm`` fallback on the target, and the hard non-targets (cosine above ``cos(theta_y +
    m)``, the pre-fallback target) modulated to ``c (t + c)``. Buffer ``t`` (0), updated ``t <- momentum
    mean(c_y) + (1 - momentum) t`` under no_grad before use, in training mode only (the official head also
    updates it in eval mode: a deviation); ignored rows are left out of the mean."""

    def __init__(self, embedding_size: int, num_classes: int, m: float = 0.5, s: float = 64.0,
                 momentum: float = 0.01, *, ignore_index: int = -1, backend: str = "auto") -> None:  # fmt: skip
        super().__init__(embedding_size, num_classes, 1, s, backend, ignore_index)
        _check_range("m", m, 0.0, math.pi / 2, "the margin, radians")
        _check_range("momentum", momentum, 0.0, 1.0, "the EMA rate of t")
        self.m, self.momentum = float(m), float(momentum)
        self.register_buffer("t", torch.zeros(()))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                c = teacher_target_cosine(embeddings, self.weight, self._safe(labels), -1).clamp(-1, 1)
                mean, n = _masked_mean(c, self._valid(labels))
                self.t.copy_(torch.where(n > 0, (1 - self.momentum) * self.t + self.momentum * mean.to(self.t), self.t))
        return self._loss(embeddings, labels, m2=self.m, fallback=True, curricular_t=self.t)


class MagFace(_MarginHead):
    """MagFace (Meng et al., CVPR 2021), as IrvingMeng/MagFace ``models/magface.py`` and its trainer.

    ``a = clamp(|x|, l_a, u_a)`` with gradient (so the margin and the regulariser have zero gradient
    outside ``[l_a, u_a]``: norms outside are clamped, as the official code does), ``m(a) = (u_m - l_m)/(u_a
    - l_a) (a - l_a) + l_m``, target ``cos(theta + m(a))`` (``easy_margin``: ``c`` where ``c <= 0``; else the
    fallback with a per-row threshold and ``mm``), and ``loss = CE + lambda_g mean(a/u_a^2 + 1/a)``. The CE
    gradient flows into ``a`` through ``m(a)``. ``lambda_g = 35`` is run.sh's value (the trainer's argparse
    default is 20). Deviation: the regulariser is averaged over the valid rows."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, l_a: float = 10.0,
                 u_a: float = 110.0, l_m: float = 0.45, u_m: float = 0.8, lambda_g: float = 35.0,
                 easy_margin: bool = True, *, ignore_index: int = -1, backend: str = "auto") -> None:  # fmt: skip
        super().__init__(embedding_size, num_classes, 1, s, backend, ignore_index)
        if not 0 < l_a < u_a:
            raise ValueError(f"l_a and u_a must satisfy 0 < l_a < u_a (the norm range), got {l_a}, {u_a}")
        if not 0 <= l_m <= u_m <= math.pi / 2:
            raise ValueError(f"l_m and u_m must satisfy 0 <= l_m <= u_m <= pi/2 (radians), got {l_m}, {u_m}")
        _check_range("lambda_g", lambda_g, 0.0, 1e6, "the weight of the norm regulariser")
        self.l_a, self.u_a, self.l_m, self.u_m = float(l_a), float(u_a), float(l_m), float(u_m)
        self.lambda_g, self.easy_margin = float(lambda_g), bool(easy_margin)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        a = torch.linalg.vector_norm(embeddings.to(compute_dtype(embeddings)), dim=1).clamp(self.l_a, self.u_a)
        margin = (self.u_m - self.l_m) / (self.u_a - self.l_a) * (a - self.l_a) + self.l_m
        ce = self._loss(embeddings, labels, m2=margin, fallback=not self.easy_margin, easy_margin=self.easy_margin)
        g, _ = _masked_mean(a / self.u_a**2 + 1 / a, self._valid(labels))
        return ce + self.lambda_g * g


class _Elastic(_MarginHead):
    def __init__(self, embedding_size, num_classes, s, m, std, plus, plus_order, generator, ignore_index, backend):
        super().__init__(embedding_size, num_classes, 1, s, backend, ignore_index)
        _check_range("m", m, 0.0, math.pi / 2, "the mean margin")
        _check_range("std", std, 0.0, 1.0, "the margins' standard deviation")
        if plus_order not in ("paper", "official"):
            raise ValueError(f"plus_order must be 'paper' or 'official', got {plus_order!r}")
        self.m, self.std, self.plus, self.plus_order, self.generator = float(m), float(std), plus, plus_order, generator

    def margins(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """This call's per-row margins (drawn anew on every call, as the official code does)."""
        cos_t = torch.zeros(labels.shape[0], dtype=compute_dtype(embeddings), device=embeddings.device)
        if self.plus:
            cos_t = teacher_target_cosine(embeddings, self.weight, self._safe(labels), -1)
        return elastic_margins(cos_t, self._valid(labels), self.m, self.std, plus=self.plus, order=self.plus_order,
                               generator=self.generator)  # fmt: skip


class ElasticArcFace(_Elastic):
    """ElasticArcFace (Boutros et al., CVPRW 2022), as fdbtrs/ElasticFace ``utils/losses.py``: ArcFace with
    a margin drawn from ``N(m, std)`` per row on every call; no fallback and no clip of the angle
    (``cos(theta + m_i)`` applies even past pi). ``std = 0.05`` is the config's value (the class default is
    0.0125). ``plus=True`` sorts the margins against the target cosines: ``plus_order="paper"`` (default)
    gives the largest cosine the smallest margin, as the paper intends; ``"official"`` reproduces the code,
    which assigns the sort permutation instead of its inverse. The official code draws from the global RNG;
    ``generator=`` (a CPU generator) makes the draws reproducible."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.5, std: float = 0.05,
                 plus: bool = False, generator: torch.Generator | None = None, *, plus_order: str = "paper",
                 ignore_index: int = -1, backend: str = "auto") -> None:  # fmt: skip
        super().__init__(embedding_size, num_classes, s, m, std, plus, plus_order, generator, ignore_index, backend)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._loss(embeddings, labels, m2=self.margins(embeddings, labels), fallback=False)


class ElasticCosFace(_Elastic):
    """ElasticCosFace: CosFace with a margin drawn from ``N(m, std)`` per row on every call (target ``c -
    m_i``); ``m = 0.35``, ``std = 0.05``, ``plus`` as :class:`ElasticArcFace`."""

    def __init__(self, embedding_size: int, num_classes: int, s: float = 64.0, m: float = 0.35, std: float = 0.05,
                 plus: bool = False, generator: torch.Generator | None = None, *, plus_order: str = "paper",
                 ignore_index: int = -1, backend: str = "auto") -> None:  # fmt: skip
        super().__init__(embedding_size, num_classes, s, m, std, plus, plus_order, generator, ignore_index, backend)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._loss(embeddings, labels, m2=0.0, m3=self.margins(embeddings, labels), fallback=False)


class SubCenterArcFace(_MarginHead):
    """Sub-center ArcFace (Deng et al., ECCV 2020): K sub-centers per class, ``weight: (C K, D)``, row
    ``c*K + k`` (insightface's and pytorch-metric-learning's layout). A class's cosine is the max over its
    sub-centers, taken inside the tile, and only the argmax gets a gradient; ArcFace on the target's max.
    ``fallback=True`` (pytorch-metric-learning's); insightface's MXNet code has none (``fallback=False``)."""

    def __init__(self, embedding_size: int, num_classes: int, K: int = 3, s: float = 64.0, m: float = 0.5,
                 fallback: bool = True, *, ignore_index: int = -1, backend: str = "auto") -> None:  # fmt: skip
        if isinstance(K, bool) or not isinstance(K, int) or not 1 <= K <= 16:
            raise ValueError(f"K (sub-centers per class) must be an int in [1, 16], got {K!r}")
        super().__init__(embedding_size, num_classes, K, s, backend, ignore_index)
        _check_range("m", m, 0.0, math.pi / 2, "the margin, radians")
        self.K, self.m, self.fallback = K, float(m), bool(fallback)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self._loss(embeddings, labels, m2=self.m, fallback=self.fallback, subcenters=self.K)
