"""Torch backend of angular distillation (the CPU path)."""

from __future__ import annotations

import torch

from mdkernels._math import EPS, compute_dtype


def forward(s, t, p):
    cd = compute_dtype(s)
    s32, t32 = s.to(cd), t.to(cd)
    ns, nt = torch.linalg.vector_norm(s32, dim=1), torch.linalg.vector_norm(t32, dim=1)
    cos = torch.bmm(s32.unsqueeze(1), t32.unsqueeze(2)).view(-1) / (ns.clamp_min(EPS) * nt.clamp_min(EPS))
    return (1 - cos).clamp_min(0).pow(p), ns, nt, cos


def backward(g, s, t, ns, nt, cos, p):
    cd = compute_dtype(s)
    gap = (1 - cos).clamp_min(0)
    if p == 1.0:
        dcos = -torch.ones_like(gap)
    else:
        dcos = torch.where(gap > 0, -p * gap.pow(p - 1), torch.zeros_like(gap))
    dcos = dcos * g
    rs, rt = ns.clamp_min(EPS).reciprocal(), nt.clamp_min(EPS).reciprocal()
    proj = torch.where(ns < EPS, torch.zeros_like(cos), cos * rs)
    ds = (t.to(cd) * rt[:, None]).sub_(s.to(cd) * proj[:, None]).mul_((dcos * rs)[:, None])
    return ds.to(s.dtype)

