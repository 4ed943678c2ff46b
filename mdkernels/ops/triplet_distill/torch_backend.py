"""Torch backend of triplet distillation (the CPU path): (anchor, positive) chunks against all negatives,
and the "hard"/"semihard" miners in anchor chunks; nothing of ``B^3`` elements."""

from __future__ import annotations

import math

import torch

from mdkernels._math import EPS

CHUNK_TERMS = 1 << 20  # triplet terms per torch chunk: 4 MB in fp32


def masks(labels: torch.Tensor, ignore_index: int):
    valid = labels != ignore_index
    same = (labels[:, None] == labels[None, :]) & valid[:, None] & valid[None, :]
    pos = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    neg = ~same & valid[:, None] & valid[None, :]
    return pos, neg


def anchor_chunks(B: int):
    step = max(1, CHUNK_TERMS // max(B * B, 1))
    for a0 in range(0, B, step):
        yield a0, min(B, a0 + step)


def all_triplets(ds, dt, labels, m_min, m_max, ignore_index):
    """(loss, dL/dDs, N): the mean hinge over every valid triplet and its gradient.

    Walks the (anchor, positive) pairs (at most B^2, usually about B times the class size) in chunks,
    each against every negative: the work is pairs x B, not B^3, and a chunk holds ``CHUNK_TERMS``.
    """
    B = ds.shape[0]
    pos, neg = masks(labels, ignore_index)
    a_all, p_all = pos.nonzero().unbind(1)  # the one host sync of mining: the number of pairs sets the work
    step = max(1, CHUNK_TERMS // max(B, 1))
    chunks = [(a_all[i : i + step], p_all[i : i + step]) for i in range(0, a_all.numel(), step)]
    d_max = torch.zeros((), dtype=ds.dtype, device=ds.device)
    count = torch.zeros((), dtype=ds.dtype, device=ds.device)  # on the device: no sync per chunk
    for a, p in chunks:
        ok = neg[a]
        gap = (dt[a] - dt[a, p][:, None]).clamp_min_(0)
        d_max = torch.maximum(d_max, torch.where(ok, gap, torch.zeros_like(gap)).amax())
        count += ok.sum()
    grad = torch.zeros_like(ds)
    # d/dD_an counts in integers: index_add_ accumulates with atomics on CUDA, in no fixed order, and integer
    # sums are the same in any order (a float index_add_ would not be bit-reproducible)
    hits = torch.zeros(B, B, dtype=torch.int32, device=ds.device)
    total = torch.zeros((), dtype=ds.dtype, device=ds.device)
    if not chunks:
        return total, grad, count
    slope = (m_max - m_min) / d_max.clamp_min(EPS)
    for a, p in chunks:
        h = (dt[a] - dt[a, p][:, None]).clamp_min_(0).mul_(slope).add_(m_min)
        h.sub_(ds[a]).add_(ds[a, p][:, None])  # D_ap - D_an + F(d_apn), (pairs, negatives)
        active = (h > 0) & neg[a]
        total += (h * active).sum()
        grad[a, p] += active.sum(1).to(ds.dtype)  # d/dD_ap: (a, p) pairs are unique
        hits.index_add_(0, a, active.to(torch.int32))  # d/dD_an: minus the times (a, n) was active
    grad -= hits.to(ds.dtype)
    n = count.clamp_min(1)  # no valid triplet: 0 and a zero gradient
    return total / n, grad / n, count




def mine(dist: torch.Tensor, labels: torch.Tensor, mining: str, ignore_index: int) -> torch.Tensor:
    """In-batch triplets ``(N, 3)`` for ``"hard"`` (per anchor the farthest positive and the closest
    negative) or ``"semihard"`` (per (anchor, positive) the closest negative farther than the positive,
    else the farthest negative), in anchor chunks: nothing of ``B^3`` elements."""
    if mining not in ("hard", "semihard"):
        raise ValueError(f"mining must be 'all', 'hard' or 'semihard', got {mining!r}")
    pos, neg = masks(labels, ignore_index)
    dist = dist.detach()
    has_neg = neg.any(1)
    if mining == "hard":  # one triplet per anchor with a positive and a negative
        a = (pos.any(1) & has_neg).nonzero().squeeze(1)  # the one host sync of mining: how many triplets
        p = dist[a].masked_fill(~pos[a], -math.inf).argmax(1)
        n = dist[a].masked_fill(~neg[a], math.inf).argmin(1)
        return torch.stack([a, p, n], 1)
    a_all, p_all = (pos & has_neg[:, None]).nonzero().unbind(1)  # the one host sync of mining
    out = []
    step = max(1, CHUNK_TERMS // max(dist.shape[0], 1))
    for i in range(0, a_all.numel(), step):  # (pairs, B) per chunk: nothing of B^3
        a, p = a_all[i : i + step], p_all[i : i + step]
        d_an, d_ap = dist[a], dist[a, p][:, None]
        outside = neg[a] & (d_an > d_ap)
        n_out = torch.where(outside, d_an, torch.full_like(d_an, math.inf)).argmin(1)
        n_in = torch.where(neg[a], d_an, torch.full_like(d_an, -math.inf)).argmax(1)
        out.append(torch.stack([a, p, torch.where(outside.any(1), n_out, n_in)], 1))
    return torch.cat(out) if out else torch.zeros(0, 3, dtype=torch.long, device=dist.device)


def loss_from_triplets(ds, dt, triplets, m_min, m_max):
    """Mean hinge over explicit triplets ``(N, 3)``; differentiable in ``ds``."""
    if triplets.shape[0] == 0:
        return ds.sum() * 0
    a, p, n = triplets.long().unbind(1)
    gap = (dt[a, n] - dt[a, p]).clamp_min(0)
    margin = (m_max - m_min) / gap.max().clamp_min(EPS) * gap + m_min
    return (ds[a, p] - ds[a, n] + margin).clamp_min(0).mean()

