"""AdaDistill (Boutros, Struc, Damer, ECCV 2024, arXiv 2407.01332), docs/math.md §8, in plain eager PyTorch:
the oracle of :func:`mdkernels.adadistill_loss` and :class:`mdkernels.nn.AdaDistill`.

Transcribes the behaviour of the official head, fdbtrs/AdaDistill ``utils/losses.py`` (``AdaptiveAArcFace``,
``AdaptiveACosFace`` with the weighted alpha, the paper's method), in mdkernels' layout (``centers: (C, D)``;
the official ``kernel`` is ``(D, C)``: ``centers = kernel.T``). Per forward, under no_grad, with the centers
as they were before the batch::

    alpha_i = clamp( cos(n(s_i), n(t_i)) * clamp(cos(W_{y_i}, n(t_i)), 1e-6, 1), 1e-6, 1 )
    W_{y_i} <- alpha_i W_{y_i} + (1 - alpha_i) n(t_i)

then ArcFace ``s cos(theta_y + m)`` (no fallback, no clip: ``cos(acos(c) + m)`` even past pi) or CosFace
``s (c_y - m)`` on the updated centers, softmax cross-entropy, mean over the rows. The gradient flows to the
student only. Deviations, each named:

* **A class twice in one batch.** The official ``kernel[:, label] = ...`` keeps whichever write lands last
  (unspecified on CUDA). Here the rows' updates are applied in batch order, each with its own alpha from the
  pre-batch centers: ``W <- a_k (... (a_1 W + (1 - a_1) t_1) ...) + (1 - a_k) t_k``. With distinct labels in
  a batch the two agree exactly.
* **Ignored rows** (``ignore_index``, -1 by default): the official head updates the last column for a -1
  label (``kernel[:, -1]``) and counts it in the update; here such a row neither updates a center nor
  counts in the loss's mean (its margin is skipped, as the official ``index`` does).
* **Several GPUs.** In the official DDP setup every rank updates its own copy of the centers with its own
  batch, so the copies drift apart. Here every rank applies the updates of the global batch, in global batch
  order (rank-major), identically: the module gathers the batch, the sharded head too.
* Norms: ``n(v) = v / max(|v|, 1e-12)`` (the official ``l2_norm`` divides by the norm: NaN on a zero row);
  cosines between normalised rows as plain dots (``CosineSimilarity``'s eps of 1e-8 changes nothing there);
  the ArcFace target derivative is the exact ``s sin(theta + m)/sin(theta)`` with theta clamped in the
  derivative (autograd of ``acos`` is infinite at cos = +-1).
* The released training script passes ``adaptive_alpha=`` to a class whose argument is
  ``adaptive_weighted_alpha``; the class default (the weighted alpha) is what is transcribed.
"""

from __future__ import annotations

import torch

from mdkernels import _validate as V
from mdkernels._math import compute_dtype
from mdkernels.reference.core import margin_cross_entropy, normalize

MARGINS = {"arcface": 0.45, "cosface": 0.35}  # the official config's ArcFace m and the CosFace class default
ALPHA_MIN = 1e-6


def adadistill_alpha(student: torch.Tensor, teacher: torch.Tensor, centers: torch.Tensor,
                     labels: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """``alpha_i`` of every row (labels must be valid classes): the student-teacher cosine weighted by the
    teacher's cosine to its class center, both clamped as the official head clamps them."""
    cd = compute_dtype(student)
    s, t = normalize(student.to(cd)), normalize(teacher.to(cd))
    cos_st = (s * t).sum(1).clamp(-1, 1)
    lam = (normalize(centers[labels].to(cd)) * t).sum(1).clamp(ALPHA_MIN, 1)
    return (cos_st * lam).clamp(ALPHA_MIN, 1.0)


@torch.no_grad()
def adadistill_update(centers: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                      ignore_index: int = -1) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(new centers, alpha)``: the centers after the batch's updates, applied row by row in batch order
    (a Python loop: the oracle), every alpha from the centers as they were before the batch; ``alpha`` is 0 on
    ignored rows. ``centers`` is not modified."""
    valid = labels != ignore_index
    new = centers.clone()
    alpha = torch.zeros(labels.shape[0], dtype=compute_dtype(student), device=student.device)
    if bool(valid.any()):
        rows = valid.nonzero().squeeze(1)
        alpha[rows] = adadistill_alpha(student[rows], teacher[rows], centers, labels[rows])
    t = normalize(teacher.to(alpha.dtype))
    for i in range(labels.shape[0]):
        if valid[i]:
            c = int(labels[i])
            new[c] = (alpha[i] * new[c].to(alpha.dtype) + (1 - alpha[i]) * t[i]).to(new.dtype)
    return new, alpha


def adadistill_loss(student: torch.Tensor, teacher: torch.Tensor, centers: torch.Tensor, labels: torch.Tensor, *,
                    margin: str = "arcface", s: float = 64.0, m: float | None = None, ignore_index: int = -1,
                    reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(loss, new centers)``: the centers' update (:func:`adadistill_update`), then ArcFace (no fallback) or
    CosFace on the updated centers, which carry no gradient. ``m`` defaults to 0.45 (ArcFace) / 0.35 (CosFace)."""
    if margin not in MARGINS:
        raise ValueError(f"margin must be 'arcface' or 'cosface', got {margin!r}")
    V.check_matrix(student, "student_embeddings")
    V.check_matrix(teacher, "teacher_embeddings", rows=student.shape[0], cols=student.shape[1])
    V.check_matrix(centers, "centers", cols=student.shape[1])
    V.check_labels(labels, student.shape[0], student.device)
    V.check_label_values(labels, centers.shape[0], ignore_index)
    m = MARGINS[margin] if m is None else float(m)
    new, _ = adadistill_update(centers.detach(), student.detach(), teacher.detach(), labels, ignore_index)
    rows = torch.full((student.shape[0],), m, dtype=compute_dtype(student), device=student.device)
    kw = dict(m2=rows, fallback=False) if margin == "arcface" else dict(m2=0.0, m3=m)  # per row: no warning
    loss = margin_cross_entropy(student, new, labels, s=s, ignore_index=ignore_index, reduction=reduction, **kw)
    return loss, new


__all__ = ["adadistill_alpha", "adadistill_loss", "adadistill_update"]
