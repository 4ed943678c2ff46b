"""docs/math.md §7 in plain eager PyTorch: the modern margin family, each as its official code computes it.

Every loss builds the full ``B x C`` (or ``B x C K``) cosine matrix, as the official heads do, and follows
their order of operations. The per-batch state (AdaFace's norm statistics, CurricularFace's ``t``) is an
argument here and its update a separate function, so that a test can hold the fused module and this
oracle at the same state. mdkernels' deviations from the official code are named where they apply:

* rows labelled ``ignore_index`` (-1) are left out of the loss and out of the batch statistics (none of
  the official heads accepts them);
* the normalisation is ``v / max(|v|, 1e-12)`` (the official heads divide by the norm, no eps);
* losses are the mean over valid rows (as ``F.cross_entropy``);
* ``sqrt(1 - c^2)`` and ``acos(c)`` keep their values but take their derivative at c clamped to
  ``[-1 + 1e-7, 1 - 1e-7]`` (docs/math.md's guard; the official code's derivative is infinite at ``|c| = 1`` and
  its gradient NaN there).

Sources: mk-minchul/AdaFace ``head.py``; HuangYG123/CurricularFace ``head/metrics.py``;
IrvingMeng/MagFace ``models/magface.py`` and ``run/trainer.py``; fdbtrs/ElasticFace ``utils/losses.py``;
deepinsight/insightface ``recognition/SubCenter-ArcFace`` and pytorch-metric-learning's
``SubCenterArcFaceLoss``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mdkernels._math import THETA_CLAMP
from mdkernels.reference.core import margin_target, normalize

ADAFACE_EPS = 1e-3  # head.py: the cosine clamp, the theta clip and the std guard


def _ce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean cross-entropy over the valid rows (0, not NaN, when none is)."""
    valid = labels != ignore_index
    if not bool(valid.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[valid], labels[valid].long())


def _guarded(c: torch.Tensor, fn) -> torch.Tensor:
    """``fn(c)`` with the derivative taken at c clamped to ``[-1 + 1e-7, 1 - 1e-7]`` (the value at c)."""
    c_d = c + (c.clamp(-1 + THETA_CLAMP, 1 - THETA_CLAMP) - c).detach()
    out_d = fn(c_d)
    return out_d + (fn(c.detach()) - out_d).detach()


def _sin_theta(c: torch.Tensor) -> torch.Tensor:
    return _guarded(c, lambda v: torch.sqrt((1.0 - v.pow(2)).clamp_min(0)))


def _acos(c: torch.Tensor) -> torch.Tensor:
    return _guarded(c, torch.acos)


def _one_hot(labels: torch.Tensor, classes: int, ignore_index: int) -> torch.Tensor:
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    return F.one_hot(safe, classes).bool() & valid[:, None]


# ---- AdaFace (Kim et al., CVPR 2022) -----------------------------------------------------------------
def adaface_batch_stats(norms, valid, batch_mean, batch_std, t_alpha):
    """The EMA update of AdaFace's norm statistics, before use: ``mean``/``std`` (unbiased) of the clipped,
    detached norms of the valid rows. A batch with one valid row updates the mean only (the official
    unbiased std would be NaN and poison the buffer); a batch with none changes nothing."""
    n = norms.detach().clip(0.001, 100)[valid]
    mean, std = batch_mean, batch_std
    if n.numel() >= 1:
        mean = n.mean() * t_alpha + (1 - t_alpha) * batch_mean
    if n.numel() >= 2:
        std = n.std() * t_alpha + (1 - t_alpha) * batch_std
    return mean, std


def adaface_loss(embeddings, centers, labels, *, batch_mean, batch_std, m=0.4, h=0.333, s=64.0, grad="exact",
                 ignore_index=-1):  # fmt: skip
    """AdaFace with the statistics already updated: ``z = clip(h (|x| - mean)/(std + eps), -1, 1)``, target
    ``cos(clip(theta - m z, eps, pi - eps)) - m (1 + z)``, every cosine clamped to ``[-1 + eps, 1 - eps]``
    (eps = 1e-3). ``grad="straight_through"``: the margin carries no gradient (CVLface)."""
    eps = ADAFACE_EPS
    norms = embeddings.detach().to(normalize(embeddings).dtype).norm(dim=1).clip(0.001, 100)
    cos = (normalize(embeddings) @ normalize(centers).T).clamp(-1 + eps, 1 - eps)
    z = ((norms - batch_mean) / (batch_std + eps) * h).clip(-1, 1)
    hot = _one_hot(labels, centers.shape[0], ignore_index)
    theta = cos.acos()
    theta_m = torch.clip(theta + torch.where(hot, -m * z[:, None], 0.0), eps, math.pi - eps)
    margined = theta_m.cos() - torch.where(hot, (m + m * z)[:, None], 0.0)
    if grad == "straight_through":
        margined = cos + (margined - cos).detach()
    return _ce(margined * s, labels, ignore_index)


# ---- CurricularFace (Huang et al., CVPR 2020) --------------------------------------------------------
def curricular_update(t, cos_t, valid, momentum=0.01):
    """``t <- momentum * mean(c_y) + (1 - momentum) * t`` over the valid rows (no gradient), before use."""
    c = cos_t.detach()[valid]
    return (c.mean() * momentum + (1 - momentum) * t) if c.numel() else t


def curricularface_loss(embeddings, centers, labels, *, t, m=0.5, s=64.0, ignore_index=-1):
    """CurricularFace with ``t`` already updated: ArcFace with the ``th``/``mm`` fallback on the target, and
    every non-target cosine above ``cos(theta_y + m)`` (the pre-fallback target) becomes ``c (t + c)``."""
    cos = (normalize(embeddings) @ normalize(centers).T).clamp(-1, 1)
    hot = _one_hot(labels, centers.shape[0], ignore_index)
    safe = torch.where(labels != ignore_index, labels, torch.zeros_like(labels)).long()
    target = cos.gather(1, safe[:, None])
    sin_t = _sin_theta(target)
    cos_m = target * math.cos(m) - sin_t * math.sin(m)
    mask = cos > cos_m
    final = torch.where(target > math.cos(math.pi - m), cos_m, target - math.sin(math.pi - m) * m)
    t = torch.as_tensor(t, dtype=cos.dtype, device=cos.device).detach()
    cos = torch.where(mask & ~hot, cos * (t + cos), cos)
    return _ce(torch.where(hot, final, cos) * s, labels, ignore_index)


# ---- MagFace (Meng et al., CVPR 2021) ----------------------------------------------------------------
def magface_loss(embeddings, centers, labels, *, s=64.0, l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8, lambda_g=35.0,
                 easy_margin=True, ignore_index=-1):  # fmt: skip
    """MagFace: ``a = clamp(|x|, l_a, u_a)`` (with gradient), ``m(a) = (u_m - l_m)/(u_a - l_a) (a - l_a) + l_m``,
    target ``cos(theta + m(a))`` (easy margin: ``c`` where ``c <= 0``; else the fallback with a per-row
    threshold and ``mm``), and ``loss = CE + lambda_g mean(a / u_a^2 + 1/a)``."""
    a = embeddings.to(normalize(embeddings).dtype).norm(dim=1, keepdim=True).clamp(l_a, u_a)
    margin = (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m
    cos = (normalize(embeddings) @ normalize(centers).T).clamp(-1, 1)
    sin = _sin_theta(cos)
    cos_m = cos * torch.cos(margin) - sin * torch.sin(margin)
    if easy_margin:
        cos_m = torch.where(cos > 0, cos_m, cos)
    else:
        mm = torch.sin(math.pi - margin) * margin
        cos_m = torch.where(cos > torch.cos(math.pi - margin), cos_m, cos - mm)
    hot = _one_hot(labels, centers.shape[0], ignore_index)
    ce = _ce(torch.where(hot, cos_m, cos) * s, labels, ignore_index)
    valid = labels != ignore_index
    g = (a[:, 0] / u_a**2 + 1 / a[:, 0])[valid]
    return ce + lambda_g * (g.mean() if g.numel() else g.sum())


# ---- ElasticFace (Boutros et al., CVPRW 2022) --------------------------------------------------------
def elastic_margins(cos_t, valid, m, std, *, plus=False, order="paper", generator=None):
    """One margin per row drawn from ``N(m, std)``, in batch order, kept on the valid rows (0 on ignored rows).
    Deviation (named): the official code draws one per labelled row only; it has no ignored rows, and with none
    the two agree draw for draw. ``plus``: the valid rows' draws sorted against their target cosines.
    ``order="paper"``: the largest target cosine gets the smallest margin. ``order="official"``:
    utils/losses.py's ``margin_sorted[argsort(cos, descending)]``, a permutation that does not do that in
    general."""
    if generator is None or generator.device.type == "cpu":
        draws = torch.normal(m, std, size=(valid.shape[0],), generator=generator).to(cos_t.device, cos_t.dtype)
    else:
        draws = torch.normal(m, std, size=(valid.shape[0],), generator=generator, device=cos_t.device)
    draws = draws.to(cos_t.dtype)[valid]
    n = draws.shape[0]
    if plus and n:
        c = cos_t.detach()[valid]
        order_desc = torch.argsort(c, descending=True)
        ascending = torch.sort(draws).values
        if order == "official":
            draws = ascending[order_desc]
        else:  # rank by descending cosine, then the rank-th smallest margin
            draws = torch.empty_like(ascending)
            draws[order_desc] = ascending
    out = torch.zeros_like(cos_t)
    out[valid] = draws
    return out


def elastic_arcface_loss(embeddings, centers, labels, *, margins, s=64.0, ignore_index=-1):
    """ElasticArcFace: target ``cos(theta + m_i)``, no fallback and no clip of the angle."""
    cos = (normalize(embeddings) @ normalize(centers).T).clamp(-1, 1)
    hot = _one_hot(labels, centers.shape[0], ignore_index)
    theta = _acos(cos) + torch.where(hot, margins[:, None], 0.0)
    return _ce(theta.cos() * s, labels, ignore_index)


def elastic_cosface_loss(embeddings, centers, labels, *, margins, s=64.0, ignore_index=-1):
    """ElasticCosFace: target ``c - m_i``."""
    cos = (normalize(embeddings) @ normalize(centers).T).clamp(-1, 1)
    hot = _one_hot(labels, centers.shape[0], ignore_index)
    return _ce((cos - torch.where(hot, margins[:, None], 0.0)) * s, labels, ignore_index)


# ---- Sub-center ArcFace (Deng et al., ECCV 2020) -----------------------------------------------------
def subcenter_arcface_loss(embeddings, centers, labels, *, K=3, s=64.0, m=0.5, fallback=True, ignore_index=-1):
    """Sub-center ArcFace: ``centers: (C K, D)``, row ``c*K + k``; a class's cosine is the max over its K
    sub-centers (after normalisation, before the margin; the gradient goes to the argmax), then ArcFace
    on the target (insightface's MXNet code has no fallback: ``fallback=False``; pytorch-metric-learning
    has one)."""
    cos = (normalize(embeddings) @ normalize(centers).T).clamp(-1, 1)
    cos = cos.view(cos.shape[0], -1, K).max(2).values
    hot = _one_hot(labels, cos.shape[1], ignore_index)
    safe = torch.where(labels != ignore_index, labels, torch.zeros_like(labels)).long()
    target = margin_target(cos.gather(1, safe[:, None]).squeeze(1), m1=1.0, m2=m, m3=0.0, fallback=fallback)
    return _ce(torch.where(hot, target[:, None], cos) * s, labels, ignore_index)


__all__ = [
    "ADAFACE_EPS",
    "adaface_batch_stats",
    "adaface_loss",
    "curricular_update",
    "curricularface_loss",
    "elastic_arcface_loss",
    "elastic_cosface_loss",
    "elastic_margins",
    "magface_loss",
    "subcenter_arcface_loss",
]
