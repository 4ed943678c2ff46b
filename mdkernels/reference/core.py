"""docs/math.md §1-6 in plain eager PyTorch: the margin CE and the distillation losses (the oracle).

Readable first, fast never: these functions materialise the full ``B x C`` cosine matrix (and ``B^3``
triplet tensors) on purpose. The formulas are those of ``docs/math.md``; names and defaults match the
fused functions in :mod:`mdkernels.functional`.

Half-precision inputs are computed in float32 (as the fused kernels accumulate); losses come back in
float32, or float64 for float64 inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mdkernels import _validate as V
from mdkernels._math import EPS, THETA_CLAMP
from mdkernels._math import compute_dtype as _compute_dtype


def normalize(v: torch.Tensor) -> torch.Tensor:
    """``v / max(||v||_2, 1e-12)`` along the last dim, in the compute dtype (fp32, or fp64)."""
    return F.normalize(v.to(_compute_dtype(v)), dim=-1, eps=EPS)


def margin_target(
    cos_t: torch.Tensor,
    *,
    m1: float = 1.0,
    m2: float | torch.Tensor = 0.5,
    m3: float | torch.Tensor = 0.0,
    fallback: bool = True,
    grad: str = "exact",
    easy_margin: bool = False,
    theta_clip: float | None = None,
) -> torch.Tensor:
    """The margin function g(c) = cos(m1*acos(c) + m2) - m3 on the target cosines ``cos_t: (B,)``.

    Derivative: exact ``m1*sin(m1*theta + m2)/sin(theta)`` with theta from c clamped to
    ``[-1 + 1e-7, 1 - 1e-7]`` (the value uses the unclamped c), or 1 for ``grad="straight_through"``.
    ``fallback`` (only when m1 == 1): where ``c < cos(pi - m2)`` use ``c - m2*sin(m2) - m3``.
    ``theta_clip`` (AdaFace): the angle ``m1*theta + m2`` is clipped to ``[clip, pi - clip]``.
    ``easy_margin`` (MagFace): where ``c <= 0`` use ``c - m3``. ``m2`` and ``m3`` may be ``(B,)`` tensors; a
    tensor ``m2`` that requires grad receives its gradient (MagFace's ``m(|x|)``), except straight-through.
    """
    m2 = torch.as_tensor(m2, dtype=cos_t.dtype, device=cos_t.device)
    m3 = torch.as_tensor(m3, dtype=cos_t.dtype, device=cos_t.device).detach()
    # value at c, derivative at the clamped c: a straight-through clamp
    c_d = cos_t + (cos_t.clamp(-1 + THETA_CLAMP, 1 - THETA_CLAMP) - cos_t).detach()
    phi_d = m1 * torch.acos(c_d) + m2
    phi_value = m1 * torch.acos(cos_t.detach()) + m2
    if theta_clip is not None:
        phi_d = phi_d.clamp(theta_clip, math.pi - theta_clip)
        phi_value = phi_value.clamp(theta_clip, math.pi - theta_clip)
    g_d = torch.cos(phi_d) - m3
    g = g_d + (torch.cos(phi_value) - m3 - g_d).detach()
    if fallback and m1 == 1.0:
        threshold = torch.cos(math.pi - m2)
        g = torch.where(cos_t < threshold, cos_t - m2 * torch.sin(m2) - m3, g)
    if easy_margin:
        g = torch.where(cos_t <= 0, cos_t - m3, g)
    if grad == "straight_through":
        g = cos_t + (g - cos_t).detach()
    return g


def margin_logits(
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full margin logits ``z: (B, C)``, target logits ``z_t: (B,)`` and the valid-row mask ``(B,)``.

    Every cosine is clamped to ``[-cos_clamp, cos_clamp]``. ``subcenters`` K: the centers are ``(C K, D)``,
    row ``c*K + k``, and a class's cosine is the max over its K rows (``torch.max``: the gradient goes to the
    argmax). ``curricular_t`` (CurricularFace): non-target cosines above ``phi_i = cos(m1 theta_y + m2) -
    m3`` (before any fallback) become ``c (t + c)``, ``t`` without gradient. Ignored rows (label ==
    ignore_index) get plain ``s*cos`` logits and ``z_t = 0``; callers mask them.
    """
    cos = (normalize(embeddings) @ normalize(centers).T).clamp(-cos_clamp, cos_clamp)
    if subcenters > 1:
        cos = cos.view(cos.shape[0], -1, subcenters).max(2).values
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    target_mask = F.one_hot(safe, cos.shape[1]).bool() & valid[:, None]
    cos_t = cos.gather(1, safe[:, None]).squeeze(1)
    z_t = s * margin_target(cos_t, m1=m1, m2=m2, m3=m3, fallback=fallback, grad=grad, easy_margin=easy_margin,
                            theta_clip=theta_clip)  # fmt: skip
    if curricular_t is not None:  # CurricularFace: the hard non-targets, against the pre-fallback target
        with torch.no_grad():
            m2_, m3_ = (torch.as_tensor(v, dtype=cos.dtype, device=cos.device) for v in (m2, m3))
            phi = torch.cos(m1 * torch.acos(cos_t) + m2_) - m3_
            t = torch.as_tensor(curricular_t, dtype=cos.dtype, device=cos.device)
        hard = (cos > phi[:, None]) & ~target_mask
        cos = torch.where(hard, cos * (t + cos), cos)
    if interclass_filter is not None:  # insightface: non-target cosines above tau are zeroed
        cos = torch.where((cos > interclass_filter) & ~target_mask, torch.zeros_like(cos), cos)
    logits = torch.where(target_mask, z_t[:, None], s * cos)
    return logits, torch.where(valid, z_t, torch.zeros_like(z_t)), valid


def reduce_rows(loss_rows: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """Mean over non-ignored rows (0, not NaN, when every row is ignored), sum, or the rows."""
    loss_rows = torch.where(valid, loss_rows, torch.zeros_like(loss_rows))
    if reduction == "none":
        return loss_rows
    if reduction == "sum":
        return loss_rows.sum()
    return loss_rows.sum() / valid.sum().clamp_min(1).to(loss_rows.dtype)


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
) -> torch.Tensor:
    """docs/math.md §1 (and the options of section 7): ``logsumexp_j(z_ij) - z_iy`` with the margin on the
    target logit.

    embeddings: (B, D), centers: (C, D) (``(C K, D)`` with sub-centers), labels: (B,) int64
    (``ignore_index`` rows are ignored).
    """
    V.check_margin_ce_args(embeddings, centers, labels, s=s, m2=m2, grad=grad, reduction=reduction, m1=m1)
    V.check_subcenters(subcenters, centers)
    V.check_margin_options(m3=m3, fallback=fallback, easy_margin=easy_margin, theta_clip=theta_clip,
                           cos_clamp=cos_clamp, curricular_t=curricular_t, batch=embeddings.shape[0],
                           device=embeddings.device)  # fmt: skip
    V.check_label_values(labels, centers.shape[0] // subcenters, ignore_index)
    logits, z_t, valid = margin_logits(
        embeddings,
        centers,
        labels,
        s=s,
        m1=m1,
        m2=m2,
        m3=m3,
        fallback=fallback,
        grad=grad,
        interclass_filter=interclass_filter,
        subcenters=subcenters,
        curricular_t=curricular_t,
        easy_margin=easy_margin,
        theta_clip=theta_clip,
        cos_clamp=cos_clamp,
        ignore_index=ignore_index,
    )
    return reduce_rows(torch.logsumexp(logits, dim=1) - z_t, valid, reduction)


def teacher_target_cosine(
    teacher_embeddings: torch.Tensor, teacher_centers: torch.Tensor, labels: torch.Tensor, ignore_index: int = -1
) -> torch.Tensor:
    """``cT_i = <n(t_i), n(W_T[y_i])>`` (no gradient); 0 for ignored rows."""
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    with torch.no_grad():
        c = (normalize(teacher_embeddings) * normalize(teacher_centers[safe])).sum(1)
    return torch.where(valid, c, torch.zeros_like(c))


def distillation_margins(
    teacher_cos: torch.Tensor,
    valid: torch.Tensor,
    *,
    m_min: float = 0.2,
    m_max: float = 0.5,
    dmax: str | float = "batch",
) -> torch.Tensor:
    """MarginDistillation's per-row margin ``m_i = (m_max - m_min)/Dmax * cT_i + m_min`` (no gradient)."""
    teacher_cos = teacher_cos.detach()
    if isinstance(dmax, str):
        if dmax not in ("batch", "global"):
            raise ValueError(f"dmax must be 'batch', 'global' or a positive float, got {dmax!r}")
        d = torch.where(valid, teacher_cos, torch.full_like(teacher_cos, -math.inf)).max()
        if dmax == "global" and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(d, op=torch.distributed.ReduceOp.MAX)
        d = float(d)
        if d == -math.inf:  # every row ignored everywhere: the margins are never used
            return torch.full_like(teacher_cos, m_min)
    else:
        d = float(dmax)
    if not d > 0:
        raise ValueError(
            f"MarginDistillation needs Dmax > 0 (the largest teacher cosine to its own center), got {d}: "
            "the teacher does not separate this batch; check teacher_centers/teacher embeddings, or pass dmax=<float>"
        )
    return (m_max - m_min) / d * teacher_cos + m_min


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
) -> torch.Tensor:
    """docs/math.md §2 (arXiv 2003.02586): ArcFace on frozen teacher centers with a per-sample margin."""
    if (teacher_embeddings is None) == (teacher_cos is None):
        raise ValueError("pass exactly one of teacher_embeddings (B, D) or teacher_cos (B,)")
    V.check_margin_range(m_min, m_max)
    valid = labels != ignore_index
    if teacher_cos is None:
        V.check_matrix(
            teacher_embeddings, "teacher_embeddings", rows=embeddings.shape[0], cols=teacher_centers.shape[1]
        )
        teacher_cos = teacher_target_cosine(teacher_embeddings, teacher_centers, labels, ignore_index)
    elif teacher_cos.shape != (embeddings.shape[0],):
        raise ValueError(f"teacher_cos must have shape ({embeddings.shape[0]},), got {tuple(teacher_cos.shape)}")
    m = distillation_margins(teacher_cos.to(_compute_dtype(embeddings)), valid, m_min=m_min, m_max=m_max, dmax=dmax)
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
) -> torch.Tensor:
    """docs/math.md §3 (arXiv 2011.00265): margin softmax on the teacher's frozen classifier."""
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
    )


def _flatten_features(t: torch.Tensor, per: str) -> torch.Tensor:
    if t.dim() == 2:
        return t
    if t.dim() != 4:
        raise ValueError(f"angular distillation takes (B, D) embeddings or (B, C, H, W) maps, got {tuple(t.shape)}")
    if per == "sample":
        return t.flatten(1)
    if per == "position":
        return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])
    raise ValueError(f"per must be 'sample' or 'position', got {per!r}")


def angular_distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, *, p: float = 2.0, per: str = "sample"
) -> torch.Tensor:
    """docs/math.md §4 (ShrinkTeaNet, arXiv 1905.10620): ``mean_i (1 - <n(s_i), n(t_i)>)^p``.

    student, teacher: (B, D) or (B, C, H, W) of equal shape; the teacher carries no gradient.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must have the same shape "
            "(use mdkernels.nn.AngularDistillation with an adapter when channel counts differ)"
        )
    if not p >= 1:
        raise ValueError(f"p must be >= 1 (1 or 2 in the papers), got {p}")
    fs, ft = _flatten_features(student, per), _flatten_features(teacher.detach(), per)
    cos = (normalize(fs) * normalize(ft)).sum(-1)
    return ((1 - cos).clamp_min(0) ** p).mean()


def pairwise_distance(e: torch.Tensor, distance: str) -> torch.Tensor:
    """All-pairs distance of normalised rows: ``"l2"`` squared euclidean or ``"angle"`` (radians)."""
    n = normalize(e)
    cos = n @ n.T
    if distance == "l2":
        return (2 - 2 * cos).clamp_min(0)
    if distance == "angle":
        return torch.acos(cos.clamp(-1 + THETA_CLAMP, 1 - THETA_CLAMP))
    raise ValueError(f"distance must be 'l2' or 'angle', got {distance!r}")


def mine_triplets(dist: torch.Tensor, labels: torch.Tensor, mining: str, ignore_index: int = -1) -> torch.Tensor:
    """In-batch triplets ``(N, 3)`` of (anchor, positive, negative) indices from labels and distances.

    ``"all"``: every valid triplet. ``"hard"``: per anchor the farthest positive and closest negative.
    ``"semihard"`` (FaceNet, as TensorFlow Addons): per (anchor, positive) the closest negative farther
    than the positive, else the farthest negative.
    """
    valid = labels != ignore_index
    same = (labels[:, None] == labels[None, :]) & valid[:, None] & valid[None, :]
    pos = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    neg = ~same & valid[:, None] & valid[None, :]
    dist = dist.detach()
    if mining == "all":
        return (pos[:, :, None] & neg[:, None, :]).nonzero()
    if mining == "hard":
        anchors = (pos.any(1) & neg.any(1)).nonzero().squeeze(1)
        p = torch.where(pos, dist, torch.full_like(dist, -math.inf)).argmax(1)
        n = torch.where(neg, dist, torch.full_like(dist, math.inf)).argmin(1)
        return torch.stack([anchors, p[anchors], n[anchors]], 1)
    if mining == "semihard":
        ap = (pos & neg.any(1, keepdim=True)).nonzero()
        a, p = ap[:, 0], ap[:, 1]
        d_an, d_ap = dist[a], dist[a, p][:, None]
        outside = neg[a] & (d_an > d_ap)
        n_out = torch.where(outside, d_an, torch.full_like(d_an, math.inf)).argmin(1)
        n_in = torch.where(neg[a], d_an, torch.full_like(d_an, -math.inf)).argmax(1)
        n = torch.where(outside.any(1), n_out, n_in)
        return torch.stack([a, p, n], 1)
    raise ValueError(f"mining must be 'all', 'hard' or 'semihard', got {mining!r}")


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
) -> torch.Tensor:
    """docs/math.md §5 (arXiv 1905.04457): triplet loss whose margin grows with the teacher's gap.

    ``L = mean max(D(a,p) - D(a,n) + F(d), 0)``, ``d = max(T(a,n) - T(a,p), 0)``,
    ``F(d) = (m_max - m_min)/d_max * d + m_min``. No triplet gives 0 (with a zero gradient).
    """
    if student.dim() != 2 or teacher.shape != student.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must both be (B, D)")
    V.check_margin_range(m_min, m_max)
    B = student.shape[0]
    d_s = pairwise_distance(student, distance)
    d_t = pairwise_distance(teacher.detach(), distance)
    if triplets is None:
        if labels is None:
            raise ValueError("pass triplets (N, 3) or labels (B,) to mine them from")
        V.check_labels(labels, B, student.device)
        triplets = mine_triplets(d_s, labels, mining, ignore_index)
    else:
        V.check_triplets(triplets, B)
    if triplets.shape[0] == 0:
        return (student.sum() * 0).to(d_s.dtype)
    a, p, n = triplets.long().unbind(1)
    gap = (d_t[a, n] - d_t[a, p]).clamp_min(0)
    margin = (m_max - m_min) / gap.max().clamp_min(EPS) * gap + m_min
    return (d_s[a, p] - d_s[a, n] + margin).clamp_min(0).mean()


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
) -> torch.Tensor:
    """docs/math.md §6: ``(1-a)*CE(z_s, y) + a*T^2*KL(softmax(z_t/T) || softmax(z_s/T))`` per row.

    Both logit sets use the same centers and carry the margin on the target. The teacher's logits are
    targets: neither the teacher embeddings nor the centers get a gradient through them (the centers
    still get one through the student's logits).
    """
    V.check_matrix(
        teacher_embeddings, "teacher_embeddings", rows=student_embeddings.shape[0], cols=student_embeddings.shape[1]
    )
    V.check_margin_ce_args(
        student_embeddings,
        centers,
        labels,
        s=s,
        m1=m1,
        m2=m2,
        grad="exact",
        reduction=reduction,
        emb_name="student_embeddings",
    )
    V.check_label_values(labels, centers.shape[0], ignore_index)
    if not T > 0:
        raise ValueError(f"T (the temperature) must be > 0, got {T}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    kw = dict(s=s, m1=m1, m2=m2, m3=m3, fallback=fallback, ignore_index=ignore_index)
    z_s, zt_s, valid = margin_logits(student_embeddings, centers, labels, **kw)
    z_t, _, _ = margin_logits(teacher_embeddings.detach(), centers.detach(), labels, **kw)
    ce = torch.logsumexp(z_s, 1) - zt_s
    log_ps, log_pt = F.log_softmax(z_s / T, 1), F.log_softmax(z_t / T, 1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(1)
    return reduce_rows((1 - alpha) * ce + alpha * T * T * kl, valid, reduction)


__all__ = [
    "angular_distillation_loss",
    "distillation_margins",
    "margin_cross_entropy",
    "margin_distillation_loss",
    "margin_kd_loss",
    "margin_logits",
    "margin_target",
    "mine_triplets",
    "normalize",
    "pairwise_distance",
    "proxyless_kd_loss",
    "reduce_rows",
    "teacher_target_cosine",
    "triplet_distillation_loss",
]
