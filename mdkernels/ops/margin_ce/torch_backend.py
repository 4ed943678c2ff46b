"""Torch backend of the fused margin CE (the CPU path): the same algorithm, one class chunk at a time."""

from __future__ import annotations

import math

import torch

from mdkernels.ops._common.chunked import chunk_cos, chunk_size, target_mask
from mdkernels.ops._common.env import NEG_BIG
from mdkernels.ops.l2norm import normalize_backward


def lse_nontarget(x, w, labels, rx, rw, s, tau) -> torch.Tensor:
    B, C = x.shape[0], w.shape[0]
    xh = x.to(rx.dtype) * rx[:, None]
    m = torch.full((B,), NEG_BIG, dtype=rx.dtype, device=x.device)
    l = torch.zeros(B, dtype=rx.dtype, device=x.device)
    step = chunk_size(B, C)
    for c0 in range(0, C, step):
        c1 = min(C, c0 + step)
        z = chunk_cos(xh, w, rw, c0, c1)
        z.clamp_(-1.0, 1.0)
        if tau is not None:
            z.masked_fill_(z > tau, 0.0)
        z.mul_(s)
        rows, cols = target_mask(labels, c0, c1)
        z[rows, cols] = -math.inf
        m_new = torch.maximum(m, z.max(1).values)
        z.sub_(m_new[:, None]).exp_()
        l = l * torch.exp(m - m_new) + z.sum(1)
        m = m_new
    return m + torch.log(l)


def grad_hat(x, w, labels, rx, rw, lse, gr, s, tau, need_dw, target_dw):
    """dL/dx^ (B, D) without the target term, and, when need_dw, the finished dL/dW (C, D).

    ``target_dw(c0, c1, rows_local, coef)`` supplies the target term for a chunk of centers so the
    normalisation backward can run chunk by chunk (no second (C, D) buffer).
    """
    B, C = x.shape[0], w.shape[0]
    xh = x.to(rx.dtype) * rx[:, None]
    dxh = torch.zeros_like(xh)
    dw = torch.empty_like(w) if need_dw else None
    step = chunk_size(B, C)
    for c0 in range(0, C, step):
        c1 = min(C, c0 + step)
        raw = chunk_cos(xh, w, rw, c0, c1)
        keep = (raw >= -1.0) & (raw <= 1.0)
        raw.clamp_(-1.0, 1.0)
        if tau is not None:
            keep &= raw <= tau
            raw.masked_fill_(raw > tau, 0.0)
        rows, cols = target_mask(labels, c0, c1)
        keep[rows, cols] = False
        # masked entries go to exp(-inf) = 0 *before* the exp: the un-margined target logit may overflow
        g = raw.mul_(s).sub_(lse[:, None]).masked_fill_(~keep, -math.inf).exp_().mul_(gr[:, None] * s)
        dxh.addmm_(g * rw[None, c0:c1], w[c0:c1].to(xh.dtype))  # dL/dx^ = sum_j g_ij w_j / |w_j|
        if need_dw:
            dwh = g.T @ xh
            dwh.index_add_(0, cols, target_dw(rows))
            normalize_backward(w[c0:c1], dwh, out=dw[c0:c1])
    return dxh, dw


