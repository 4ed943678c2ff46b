"""Public functions of mdkernels: plan the call, then run its fused op.

Each function gets the plan of its call (:mod:`mdkernels._plan` for the margin ops: the arguments checked, the
operand dtype, the backend that can run it, ``"auto"`` resolved; the other ops check their arguments and ask
:func:`mdkernels.backends.resolve`), then calls its op in :mod:`mdkernels.ops` with that plan (or the eager oracle
of :mod:`mdkernels.reference`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from mdkernels import _plan, backends, reference
from mdkernels import _validate as V
from mdkernels._math import compute_dtype, margin_rows
from mdkernels.ops import angular_distill, margin_ce, margin_kd, triplet_distill
from mdkernels.ops._common.centers import adadistill_update_
from mdkernels.ops._common.env import no_autocast
from mdkernels.ops._common.margin import distillation_margins, teacher_target_cosine
from mdkernels.ops.l2norm import l2_normalize
from mdkernels.ops.triplet_distill import torch_backend as triplet_torch
from mdkernels.search import cosine_topk_search  # noqa: F401 (the registry finds every public function here)


class MarginCEStats(NamedTuple):
    """Per-row statistics of a margin cross-entropy call, all ``(B,)``, no gradient.

    lse: logsumexp over classes of the margin logits; cos_target: clamped cosine to the row's own
    center; loss_rows: per-row loss (0 for ignored rows).
    """

    lse: torch.Tensor
    cos_target: torch.Tensor
    loss_rows: torch.Tensor


def resolve_backend(
    backend: str, t: torch.Tensor, op: str = "margin_ce", shape: tuple[int, int, int] = (0, 0, 0)
) -> str:
    """The concrete backend ``backend`` means for ``op`` on tensor ``t`` (see :func:`mdkernels.backends.resolve`,
    where every backend rule lives)."""
    return backends.resolve(op, backend, t, shape)


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
    m3: float | torch.Tensor = 0.0,
    fallback: bool = True,
    grad: str = "exact",
    interclass_filter: float | None = None,
    subcenters: int = 1,
    curricular_t: float | torch.Tensor | None = None,
    easy_margin: bool = False,
    theta_clip: float | None = None,
    cos_clamp: float = 1.0,
    ignore_index: int = -1,
    reduction: str = "mean",
    backend: str = "auto",
    return_stats: bool = False,
    check_finite: bool = False,
):
    """Margin-based softmax cross-entropy (ArcFace / CosFace / SphereFace / combined and the modern margin
    family), fused.

    embeddings: (B, D) student features (any scale: they are normalised here).
    centers: (C, D) class centers (insightface's ``weight`` layout), or ``(C K, D)`` with ``subcenters=K``
    (row ``c*K + k``; a class's cosine is the max over its K rows); frozen centers skip their GEMM.
    labels: (B,) int64 in [0, C), or ``ignore_index`` for rows that do not count.
    Target logit ``s*(cos(m1*theta + m2) - m3)``, others ``s*cos``. ``m2``, ``m3`` may be ``(B,)`` tensors;
    a tensor ``m2`` that requires grad gets ``dL/dm2`` (MagFace). ``curricular_t`` (a float or a 0-d tensor):
    CurricularFace's modulation of the hard non-targets. ``easy_margin`` (MagFace), ``theta_clip`` and
    ``cos_clamp`` (AdaFace): see docs/math.md §7. ``grad="straight_through"`` passes ``s`` as the target
    derivative (insightface arcface_torch). Returns the loss (float32; float64 for float64 inputs); with
    ``return_stats=True`` also :class:`MarginCEStats`. Nothing the fused backends allocate grows with ``B x C``
    (docs/design.md, "Memory").
    """
    plan = _plan.margin_ce(embeddings, centers, labels, s=s, m1=m1, m2=m2, m3=m3, fallback=fallback, grad=grad,
                           subcenters=subcenters, curricular_t=curricular_t, easy_margin=easy_margin,
                           theta_clip=theta_clip, cos_clamp=cos_clamp, reduction=reduction, check_finite=check_finite,
                           backend=backend)  # fmt: skip
    tau = None if interclass_filter is None else float(interclass_filter)
    theta_clip = None if theta_clip is None else float(theta_clip)
    if plan.backend == "reference":
        if return_stats:
            raise ValueError("return_stats needs a fused backend ('triton', 'cuda' or 'torch'), not 'reference'")
        return reference.margin_cross_entropy(embeddings, centers, labels, s=s, m1=m1, m2=m2, m3=m3, fallback=fallback,
                                              grad=grad, interclass_filter=tau, subcenters=subcenters,
                                              curricular_t=curricular_t, easy_margin=easy_margin,
                                              theta_clip=theta_clip, cos_clamp=float(cos_clamp),
                                              ignore_index=ignore_index, reduction=reduction)  # fmt: skip
    loss_rows, lse, cos_t, *_ = margin_ce.margin_ce_forward(
        embeddings, centers, labels, plan.m2, plan.m3, plan.curricular_t, float(s), float(m1), bool(fallback), grad,
        bool(easy_margin), theta_clip, float(cos_clamp), tau, int(subcenters), int(ignore_index), plan.need_dx,
        plan.backend, plan.op_dtype,
    )  # fmt: skip
    loss = _reduce(loss_rows, labels, ignore_index, reduction)
    if return_stats:
        return loss, MarginCEStats(lse, cos_t, loss_rows.detach())
    return loss


def margin_distillation_loss(
    embeddings: torch.Tensor,
    teacher_centers: torch.Tensor,
    labels: torch.Tensor,
    *,
    teacher_embeddings: torch.Tensor | None = None,
    teacher_cos: torch.Tensor | None = None,
    s: float = 64.0,
    m_min: float = 0.2,
    m_max: float = 0.5,
    dmax: str | float = "batch",
    fallback: bool = False,
    ignore_index: int = -1,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """MarginDistillation (Svitov & Alyamkin, arXiv 2003.02586), fused.

    The student trains against the teacher's class centers, frozen, with ArcFace and a per-sample
    margin ``m_i = (m_max - m_min)/Dmax * cT_i + m_min``. Here ``cT_i`` is the teacher's cosine to its
    own center and ``Dmax = max_i cT_i`` over the batch (``dmax="batch"``, the official code), across
    ranks (``"global"``), or a given float.

    embeddings: (B, D) student; teacher_centers: (C, D); labels: (B,). Pass ``teacher_embeddings``
    (B, D) or precomputed ``teacher_cos`` (B,). The margin carries no gradient; ``cT_i < 0`` gives
    ``m_i < m_min`` (kept, as the formula says); ``Dmax <= 0`` raises. ``fallback=False`` matches the
    official code's literal ``cos(theta + m)``.
    """
    if (teacher_embeddings is None) == (teacher_cos is None):
        raise ValueError("pass exactly one of teacher_embeddings (B, D) or teacher_cos (B,)")
    V.check_margin_range(m_min, m_max)
    V.check_matrix(embeddings, "embeddings")
    V.check_labels(labels, embeddings.shape[0], embeddings.device)
    V.check_matrix(teacher_centers, "teacher_centers", cols=embeddings.shape[1])
    valid = V.label_mask(labels, teacher_centers.shape[0], ignore_index)  # bad labels: an error, never an index
    if teacher_cos is None:
        V.check_matrix(
            teacher_embeddings, "teacher_embeddings", rows=embeddings.shape[0], cols=teacher_centers.shape[1]
        )
        V.check_same(teacher_embeddings, teacher_centers, "teacher_embeddings", "teacher_centers")
        safe = torch.where(valid, labels, torch.full_like(labels, -1))
        teacher_cos = teacher_target_cosine(teacher_embeddings, teacher_centers, safe, -1)
    elif not isinstance(teacher_cos, torch.Tensor) or teacher_cos.shape != (embeddings.shape[0],):
        raise ValueError(f"teacher_cos must be a tensor of shape ({embeddings.shape[0]},)")
    m = distillation_margins(teacher_cos.to(compute_dtype(embeddings)), valid, m_min=m_min, m_max=m_max, dmax=dmax)
    return margin_cross_entropy(
        embeddings,
        teacher_centers.detach(),
        labels,
        s=s,
        m1=1.0,
        m2=m,
        m3=0.0,
        fallback=fallback,
        ignore_index=ignore_index,
        reduction=reduction,
        backend=backend,
    )


def proxyless_kd_loss(
    embeddings: torch.Tensor,
    teacher_centers: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: str = "arcface",
    s: float = 64.0,
    m: float = 0.5,
    ignore_index: int = -1,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """ProxylessKD (arXiv 2011.00265), fused: margin softmax on the teacher's frozen classifier.

    The student inherits the teacher's centers ``(C, D)`` and trains in the teacher's embedding space;
    ``margin``: ``"arcface"`` (m2 = m), ``"cosface"`` (m3 = m) or ``"sphereface"`` (m1 = m). A student
    whose embedding size differs raises (see :class:`mdkernels.nn.ProxylessKD` for a projection).
    """
    V.check_proxyless_dims(embeddings, teacher_centers)
    m1, m2, m3 = V.margin_triple(margin, m)
    return margin_cross_entropy(
        embeddings,
        teacher_centers.detach(),
        labels,
        s=s,
        m1=m1,
        m2=m2,
        m3=m3,
        ignore_index=ignore_index,
        reduction=reduction,
        backend=backend,
    )


ADADISTILL_MARGINS = {"arcface": 0.45, "cosface": 0.35}  # the official config's ArcFace m, CosFace's class default


def adadistill_options(margin: str, m: float | None) -> dict:
    """The margin-CE options of AdaDistill's ``margin``: ArcFace ``cos(theta + m)`` with no fallback (the official
    ``acos``/``cos``), or CosFace ``c - m``; ``m`` defaults to 0.45 / 0.35."""
    if margin not in ADADISTILL_MARGINS:
        raise ValueError(f"margin must be 'arcface' or 'cosface' (AdaDistill's two heads), got {margin!r}")
    m = ADADISTILL_MARGINS[margin] if m is None else float(m)
    if not 0 <= m <= math.pi / 2:
        raise ValueError(f"m (the margin) must be in [0, pi/2], got {m}")
    return dict(m2=m, fallback=False) if margin == "arcface" else dict(m2=0.0, m3=m)


def adadistill_loss(
    student_embeddings: torch.Tensor,
    teacher_embeddings: torch.Tensor,
    centers: torch.Tensor,
    labels: torch.Tensor,
    *,
    margin: str = "arcface",
    s: float = 64.0,
    m: float | None = None,
    ignore_index: int = -1,
    reduction: str = "mean",
    update: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """AdaDistill (Boutros, Struc, Damer, ECCV 2024, arXiv 2407.01332), fused.

    The student trains with ArcFace (``m = 0.45``, no fallback) or CosFace (``m = 0.35``) against class centers
    that no optimizer touches: before the loss, without gradient, each row moves its class's center toward the
    teacher, ``W_y <- alpha W_y + (1 - alpha) n(t)``, with ``alpha = clamp(cos(s, t) clamp(cos(W_y, t), 1e-6, 1),
    1e-6, 1)`` from the centers as they were before the batch (a class's rows compose in batch order). This
    function updates ``centers`` **in place** (``update=False`` skips it), then runs the fused margin CE on them
    as frozen centers: no GEMM for their gradient, no ``B x C`` tensor, no host sync.

    student_embeddings, teacher_embeddings: (B, D); centers: (C, D) (the official ``kernel.T``); labels: (B,),
    ``ignore_index`` rows neither update nor count. See :mod:`mdkernels.reference.adadistill` for every named
    deviation from the official head.
    """
    opts = adadistill_options(margin, m)
    V.check_matrix(student_embeddings, "student_embeddings")
    V.check_matrix(teacher_embeddings, "teacher_embeddings", rows=student_embeddings.shape[0],
                   cols=student_embeddings.shape[1])  # fmt: skip
    V.check_matrix(centers, "centers", cols=student_embeddings.shape[1])
    V.check_same(student_embeddings, centers, "student_embeddings", "centers")
    if teacher_embeddings.device != student_embeddings.device:
        raise ValueError(f"teacher_embeddings is on {teacher_embeddings.device} but student_embeddings is on "
                         f"{student_embeddings.device}: move both to one device")  # fmt: skip
    V.check_labels(labels, student_embeddings.shape[0], student_embeddings.device)
    if update:
        if centers.requires_grad and torch.is_grad_enabled():
            raise ValueError("centers must not require grad: AdaDistill's centers move by their update alone "
                             "(pass a buffer, or centers.detach())")  # fmt: skip
        valid = V.label_mask(labels, centers.shape[0], ignore_index)
        with no_autocast(centers):
            adadistill_update_(centers, student_embeddings.detach(), teacher_embeddings.detach(), labels.long(), valid)
    if margin == "arcface":  # the official cos(theta + m) past pi, on purpose: per-row margins say so without a warning
        opts["m2"] = margin_rows(opts["m2"], student_embeddings)
    return margin_cross_entropy(student_embeddings, centers.detach(), labels, s=s, ignore_index=ignore_index,
                                reduction=reduction, backend=backend, **opts)  # fmt: skip


def angular_distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    p: float = 2.0,
    per: str = "sample",
    backend: str = "auto",
) -> torch.Tensor:
    """Angular distillation (ShrinkTeaNet, arXiv 1905.10620), fused: ``mean_i (1 - cos(s_i, t_i))^p``.

    student, teacher: (B, D) embeddings or (B, C, H, W) feature maps of equal shape, compared per
    sample (flattened, default) or per spatial position (``per="position"``). p = 2 (ShrinkTeaNet as
    cited by VarGFaceNet) or 1 (MarginDistillation's baseline). The teacher gets no gradient. One fused
    row kernel per direction reads each input once.
    """
    if not isinstance(student, torch.Tensor) or not isinstance(teacher, torch.Tensor):
        raise TypeError("student and teacher must be tensors")
    if student.shape != teacher.shape:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must have the same shape "
            "(mdkernels.nn.AngularDistillation adds a 1x1-conv adapter when channel counts differ)"
        )
    V.check_same(student, teacher, "student", "teacher")
    if student.dtype not in V.FLOAT_DTYPES:
        raise ValueError(f"student must be a floating tensor, got {student.dtype}")
    if not p >= 1:
        raise ValueError(f"p must be >= 1 (1 or 2 in the papers), got {p}")
    if per not in ("sample", "position"):
        raise ValueError(f"per must be 'sample' or 'position', got {per!r}")
    numel = student.numel()  # the dispatch table is measured per (rows, 1, row length)
    rows = numel // student.shape[1] if per == "position" and student.dim() > 2 else student.shape[0]
    backend = backends.resolve("angular_distill", backend, student, (rows, 1, numel // max(rows, 1)))
    if backend == "reference":
        return reference.angular_distillation_loss(student, teacher, p=p, per=per)
    s_rows, t_rows = angular_distill.rows_of(student, per), angular_distill.rows_of(teacher.detach(), per)
    if s_rows.shape[0] == 0:
        raise ValueError("student has no rows to compare")
    loss_rows = angular_distill.angular_distill_forward(s_rows, t_rows, float(p), backend)[0]
    return loss_rows.mean()


def triplet_distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    triplets: torch.Tensor | None = None,
    *,
    labels: torch.Tensor | None = None,
    mining: str = "all",
    distance: str = "l2",
    m_min: float = 0.2,
    m_max: float = 0.5,
    ignore_index: int = -1,
    backend: str = "auto",
) -> torch.Tensor:
    """Triplet distillation (Feng et al., arXiv 1905.04457), fused: the margin grows with the teacher's gap.

    ``L = mean max(D(a,p) - D(a,n) + F(d), 0)`` with ``d = max(T(a,n) - T(a,p), 0)`` and
    ``F(d) = (m_max - m_min)/d_max * d + m_min`` (``d_max`` the largest gap; all gaps 0 gives m_min).
    student, teacher: (B, D); distances on normalised rows, ``"l2"`` (squared) or ``"angle"``.
    Triplets: explicit ``(N, 3)`` (anchor, positive, negative) indices, or mined from ``labels``:
    ``"all"`` valid triplets (streamed, never ``B^3`` in memory), ``"hard"``, ``"semihard"``. No valid
    triplet gives 0 with a zero gradient.
    """
    if student.dim() != 2 or teacher.shape != student.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must both be (B, D)")
    V.check_same(student, teacher, "student", "teacher")
    if distance not in ("l2", "angle"):
        raise ValueError(f"distance must be 'l2' or 'angle', got {distance!r}")
    if mining not in ("all", "hard", "semihard"):
        raise ValueError(f"mining must be 'all', 'hard' or 'semihard', got {mining!r}")
    V.check_margin_range(m_min, m_max)
    backend = backends.resolve("triplet_distill", backend, student)
    if triplets is None and labels is None:
        raise ValueError("pass triplets (N, 3) or labels (B,) to mine them from")
    if triplets is None:
        V.check_labels(labels, student.shape[0], student.device)
    else:
        V.check_triplets(triplets, student.shape[0], deferred=backend != "reference")
    if backend == "reference":
        return reference.triplet_distillation_loss(
            student,
            teacher,
            triplets,
            labels=labels,
            mining=mining,
            distance=distance,
            m_min=m_min,
            m_max=m_max,
            ignore_index=ignore_index,
        )
    ds = triplet_distill.pairwise_distance(student, distance)
    dt = triplet_distill.pairwise_distance(teacher.detach(), distance)
    if triplets is None and mining == "all":
        return triplet_distill.TripletAll.apply(ds, dt, labels.long(), float(m_min), float(m_max), int(ignore_index),
                                                backend)  # fmt: skip
    if triplets is None:  # mining: one host sync, the number of triplets (data-dependent shapes)
        triplets = triplet_torch.mine(ds, labels.long(), mining, ignore_index)
    else:  # out-of-range indices are an error (at the next call on a GPU); meanwhile they must not index
        triplets = triplets.long().clamp(0, max(student.shape[0] - 1, 0))
    return triplet_torch.loss_from_triplets(ds, dt, triplets, m_min, m_max)


def margin_kd_loss(
    student_embeddings: torch.Tensor,
    teacher_embeddings: torch.Tensor,
    centers: torch.Tensor,
    labels: torch.Tensor,
    *,
    T: float = 4.0,
    alpha: float = 0.95,
    s: float = 64.0,
    m1: float = 1.0,
    m2: float = 0.5,
    m3: float = 0.0,
    fallback: bool = True,
    ignore_index: int = -1,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Hinton KD on margin logits, fused: ``(1-a) CE(z_s, y) + a T^2 KL(softmax(z_t/T) || softmax(z_s/T))``.

    student_embeddings, teacher_embeddings: (B, D); centers: (C, D) shared (usually the teacher's);
    labels: (B,). Both logit sets carry the margin ``s*(cos(m1*theta + m2) - m3)`` on the target. One
    streaming pass over class tiles computes both logsumexps and the cross term; no ``B x C`` tensor.
    The teacher's logits are targets: no gradient flows through them.
    """
    plan = _plan.margin_kd(student_embeddings, teacher_embeddings, centers, labels, T=T, alpha=alpha, s=s, m1=m1,
                           m2=m2, reduction=reduction, backend=backend)  # fmt: skip
    backend = plan.backend
    if backend == "reference":
        return reference.margin_kd_loss(
            student_embeddings,
            teacher_embeddings,
            centers,
            labels,
            T=T,
            alpha=alpha,
            s=s,
            m1=m1,
            m2=m2,
            m3=m3,
            fallback=fallback,
            ignore_index=ignore_index,
            reduction=reduction,
        )
    loss_rows = margin_kd.margin_kd_forward(
        student_embeddings, teacher_embeddings.detach(), centers, labels, float(T), float(alpha), float(s),
        float(m1), float(m2), float(m3), bool(fallback), int(ignore_index), plan.need_dx, backend, plan.op_dtype,
    )[0]  # fmt: skip
    return _reduce(loss_rows, labels, ignore_index, reduction)


__all__ = [
    "adadistill_loss",
    "cosine_topk_search",
    "margin_kd_loss",
    "triplet_distillation_loss",
    "angular_distillation_loss",
    "MarginCEStats",
    "l2_normalize",
    "margin_cross_entropy",
    "margin_distillation_loss",
    "proxyless_kd_loss",
    "resolve_backend",
]
