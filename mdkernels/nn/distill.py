"""Distillation losses as modules. Teacher centers are buffers: frozen, saved with the student,
moved with ``.to()``.

``MarginDistillation`` and ``ProxylessKD`` replace the student's classification head (the student
trains against the teacher's centers). ``AngularDistillation``, ``TripletDistillation`` and ``MarginKD``
are added to a classification loss: ``L = L_arcface + lambda * L_distill``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mdkernels import _validate as V
from mdkernels import functional as F_


def _centers_buffer(teacher_centers: torch.Tensor) -> torch.Tensor:
    if not isinstance(teacher_centers, torch.Tensor) or teacher_centers.dim() != 2:
        raise ValueError("teacher_centers must be a (C, D) tensor (the teacher head's weight)")
    return teacher_centers.detach().clone()


class MarginDistillation(nn.Module):
    """MarginDistillation (arXiv 2003.02586): ArcFace on the teacher's frozen centers with a per-sample
    margin from the teacher's cosine to its own center.

    ``forward(embeddings: (B, D), labels: (B,), teacher_embeddings=None, teacher_cos=None) -> loss``;
    pass the teacher's embeddings of the batch, or their precomputed cosines ``(B,)``.
    """

    def __init__(self, teacher_centers: torch.Tensor, s: float = 64.0, m_min: float = 0.2, m_max: float = 0.5,
                 dmax: str | float = "batch", fallback: bool = False, backend: str = "auto") -> None:  # fmt: skip
        super().__init__()
        self.register_buffer("teacher_centers", _centers_buffer(teacher_centers))
        self.s, self.m_min, self.m_max, self.dmax = s, m_min, m_max, dmax
        self.fallback, self.backend = fallback, backend

    def forward(self, embeddings, labels, teacher_embeddings=None, teacher_cos=None):
        w = self.teacher_centers
        return F_.margin_distillation_loss(
            embeddings.to(w.dtype), w, labels,
            teacher_embeddings=None if teacher_embeddings is None else teacher_embeddings.to(w.dtype),
            teacher_cos=teacher_cos, s=self.s, m_min=self.m_min, m_max=self.m_max, dmax=self.dmax,
            fallback=self.fallback, backend=self.backend,
        )  # fmt: skip


class ProxylessKD(nn.Module):
    """ProxylessKD (arXiv 2011.00265): margin softmax on the teacher's inherited, frozen classifier.

    ``projection=True`` adds a learnable linear map from the student's ``embedding_size`` to the
    teacher's (an option beyond the paper, for students of another width).
    """

    def __init__(
        self,
        teacher_centers: torch.Tensor,
        margin: str = "arcface",
        s: float = 64.0,
        m: float = 0.5,
        projection: bool = False,
        embedding_size: int | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.register_buffer("teacher_centers", _centers_buffer(teacher_centers))
        V.margin_triple(margin, m)  # an unknown margin family fails here, not at the first forward
        self.margin, self.s, self.m, self.backend = margin, s, m, backend
        dim = self.teacher_centers.shape[1]
        if projection:
            if embedding_size is None:
                raise ValueError("projection=True needs embedding_size (the student's embedding dimension)")
            self.projection = nn.Linear(embedding_size, dim, bias=False)
        else:
            self.projection = None

    def forward(self, embeddings, labels):
        if self.projection is not None:
            embeddings = self.projection(embeddings)
        w = self.teacher_centers
        return F_.proxyless_kd_loss(embeddings.to(w.dtype), w, labels, margin=self.margin, s=self.s, m=self.m,
                                    backend=self.backend)  # fmt: skip


class AngularDistillation(nn.Module):
    """ShrinkTeaNet's angular distillation over one or more stages (arXiv 1905.10620).

    Args:
        channels: per stage, ``(student_channels, teacher_channels)``; where they differ, a learnable
            1x1 conv (maps) or linear layer (embeddings) adapts the student to the teacher.
        weights: per-stage weights (default 1 each). p: 2 (paper) or 1. per: "sample" or "position".
    ``forward(students: list, teachers: list) -> sum_k w_k * L_k``; a single tensor pair works too.
    """

    def __init__(self, channels: Sequence[tuple[int, int]] = (), weights: Sequence[float] | None = None,
                 p: float = 2.0, per: str = "sample", backend: str = "auto") -> None:  # fmt: skip
        super().__init__()
        self.channels = list(channels)
        self.weights = list(weights) if weights is not None else [1.0] * max(1, len(self.channels))
        if self.channels and len(self.weights) != len(self.channels):
            raise ValueError(f"weights has {len(self.weights)} entries for {len(self.channels)} stages")
        self.adapters = nn.ModuleList(
            nn.Conv2d(cs, ct, 1, bias=False) if cs != ct else nn.Identity() for cs, ct in self.channels
        )
        self.p, self.per, self.backend = p, per, backend

    def forward(self, students, teachers):
        if isinstance(students, torch.Tensor):
            students, teachers = [students], [teachers]
        if len(students) != len(teachers) or len(students) != len(self.weights):
            raise ValueError(f"expected {len(self.weights)} student/teacher pairs, got {len(students)}/{len(teachers)}")
        total = 0.0
        for k, (fs, ft) in enumerate(zip(students, teachers, strict=True)):
            if k < len(self.adapters):
                adapter = self.adapters[k]
                if isinstance(adapter, nn.Conv2d) and fs.dim() == 2:
                    fs = adapter(fs[:, :, None, None])[:, :, 0, 0]
                else:
                    fs = adapter(fs)
            total = total + self.weights[k] * F_.angular_distillation_loss(
                fs, ft.to(fs.dtype), p=self.p, per=self.per, backend=self.backend
            )
        return total


class TripletDistillation(nn.Module):
    """Triplet distillation (arXiv 1905.04457): triplet loss with a margin set by the teacher's gap.

    ``forward(student: (B, D), teacher: (B, D), labels=None, triplets=None) -> loss``.
    """

    def __init__(self, mining: str = "all", distance: str = "l2", m_min: float = 0.2, m_max: float = 0.5,
                 backend: str = "auto") -> None:  # fmt: skip
        super().__init__()
        self.mining, self.distance, self.m_min, self.m_max, self.backend = mining, distance, m_min, m_max, backend

    def forward(self, student, teacher, labels=None, triplets=None):
        return F_.triplet_distillation_loss(
            student, teacher.to(student.dtype), triplets, labels=labels, mining=self.mining,
            distance=self.distance, m_min=self.m_min, m_max=self.m_max, backend=self.backend,
        )  # fmt: skip


class MarginKD(nn.Module):
    """Hinton KD on margin logits against shared (teacher) centers: docs/math.md §6.

    ``forward(student_embeddings, teacher_embeddings, labels) -> loss``; the centers are a frozen buffer
    (``trainable_centers=True`` makes them a parameter instead).
    """

    def __init__(self, centers: torch.Tensor, T: float = 4.0, alpha: float = 0.95, s: float = 64.0,
                 m2: float = 0.5, trainable_centers: bool = False, backend: str = "auto") -> None:  # fmt: skip
        super().__init__()
        if trainable_centers:
            self.centers = nn.Parameter(_centers_buffer(centers))
        else:
            self.register_buffer("centers", _centers_buffer(centers))
        self.T, self.alpha, self.s, self.m2, self.backend = T, alpha, s, m2, backend

    def forward(self, student_embeddings, teacher_embeddings, labels):
        w = self.centers
        return F_.margin_kd_loss(
            student_embeddings.to(w.dtype), teacher_embeddings.to(w.dtype), w, labels, T=self.T,
            alpha=self.alpha, s=self.s, m2=self.m2, backend=self.backend,
        )  # fmt: skip


class AdaDistill(nn.Module):
    """AdaDistill (Boutros, Struc, Damer, ECCV 2024): the student's ArcFace (or CosFace) head whose centers
    move toward the teacher's embeddings instead of being learned (:func:`mdkernels.adadistill_loss`).

    ``weight: (C, D)`` is a buffer (no optimizer touches it; saved and moved with the module), initialised
    ``N(0, 0.01)`` as the official ``kernel`` (which is ``(D, C)``: ``weight.copy_(kernel.T)`` loads one), each
    row from the seed and its index (:func:`mdkernels.ops._common.centers.normal_rows`: the sharded head starts
    from the same rows).
    ``forward(student_embeddings: (B, D), teacher_embeddings: (B, D), labels: (B,)) -> loss``: the centers'
    update (every call, as the official head, which the official script runs in ``eval()`` mode; pass
    ``update=False`` to freeze them), then the fused margin CE on the updated, frozen centers. Under
    ``torch.distributed``, every rank applies the updates of the global batch (gathered, in rank order), so
    the copies stay identical (the official DDP setup lets them drift). ``last_alpha``: the rows' alphas of
    the last call, a device tensor (no host sync). ``margin``: "arcface" (``m = 0.45``) or "cosface"
    (``m = 0.35``). For centers sharded over ranks, see :class:`mdkernels.distributed.ShardedAdaDistill`.
    """

    def __init__(self, embedding_size: int, num_classes: int, margin: str = "arcface", s: float = 64.0,
                 m: float | None = None, *, update: bool = True, ignore_index: int = -1,
                 backend: str = "auto") -> None:  # fmt: skip
        super().__init__()
        if embedding_size <= 0 or num_classes <= 0:
            raise ValueError(f"embedding_size and num_classes must be positive, got {embedding_size}, {num_classes}")
        self.options = F_.adadistill_options(margin, m)  # checks the margin's name and size
        V.check_scale(s)
        self.embedding_size, self.num_classes, self.margin = embedding_size, num_classes, margin
        self.s, self.m = float(s), self.options.get("m3", self.options["m2"])
        self.update, self.ignore_index, self.backend = bool(update), ignore_index, backend
        from mdkernels.ops._common.centers import normal_rows

        self.register_buffer("weight", normal_rows(0, num_classes, embedding_size))
        self.last_alpha: torch.Tensor | None = None

    def forward(self, student_embeddings: torch.Tensor, teacher_embeddings: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:  # fmt: skip
        w = self.weight
        x = student_embeddings.to(w.dtype) if student_embeddings.dtype != w.dtype else student_embeddings
        t = teacher_embeddings.to(w.dtype)
        if self.update:
            self.last_alpha = _update_with_global_batch(w, x, t, labels, self.ignore_index)
        return F_.adadistill_loss(x, t, w, labels, margin=self.margin, s=self.s, m=self.m, update=False,
                                  ignore_index=self.ignore_index, backend=self.backend)  # fmt: skip

    def extra_repr(self) -> str:
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, margin={self.margin!r}, "
                f"s={self.s}, m={self.m}, update={self.update}, backend={self.backend!r}")  # fmt: skip


def _update_with_global_batch(w, x, t, labels, ignore_index):
    """The update of :func:`mdkernels.adadistill_loss` with every rank's rows (in rank order) when
    torch.distributed runs with several ranks, else with this batch; the alphas of this rank's rows."""
    import torch.distributed as dist

    from mdkernels.ops._common.centers import adadistill_update_
    from mdkernels.ops._common.env import no_autocast

    V.check_matrix(x, "student_embeddings")
    V.check_matrix(t, "teacher_embeddings", rows=x.shape[0], cols=x.shape[1])
    V.check_matrix(w, "weight", cols=x.shape[1])
    V.check_labels(labels, x.shape[0], x.device)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rows = (x.detach(), t.detach(), labels.long())
    if world > 1:
        from mdkernels.distributed import gather_rows

        rows = tuple(gather_rows(r) for r in rows)
    valid = V.label_mask(rows[2], w.shape[0], ignore_index)
    with no_autocast(w):
        alpha = adadistill_update_(w, rows[0], rows[1], rows[2], valid)
    if world > 1:
        rank = dist.get_rank()
        alpha = alpha[rank * x.shape[0] : (rank + 1) * x.shape[0]]
    return alpha
