"""Torch backend of the fused margin KD (the CPU path): the same algorithm, one class chunk at a time."""

from __future__ import annotations

import math

import torch

from mdkernels.ops._common.chunked import chunk_cos, chunk_size, target_mask
from mdkernels.ops._common.env import NEG_BIG
from mdkernels.ops.l2norm import normalize_backward


def stats(xs, xt, w, labels, rxs, rxt, rw, s, T):
    B, C = xs.shape[0], w.shape[0]
    cd = rxs.dtype
    xsh, xth = xs.to(cd) * rxs[:, None], xt.to(cd) * rxt[:, None]
    m_s = torch.full((B,), NEG_BIG, dtype=cd, device=xs.device)
    m_t = m_s.clone()
    l_s, l_sT, l_tT, A = (torch.zeros(B, dtype=cd, device=xs.device) for _ in range(4))
    step = chunk_size(2 * B, C)
    for c0 in range(0, C, step):
        c1 = min(C, c0 + step)
        zs = chunk_cos(xsh, w, rw, c0, c1).clamp_(-1.0, 1.0).mul_(s)
        zt = chunk_cos(xth, w, rw, c0, c1).clamp_(-1.0, 1.0).mul_(s)
        rows, cols = target_mask(labels, c0, c1)
        zs[rows, cols] = -math.inf
        zt[rows, cols] = -math.inf
        ms_new = torch.maximum(m_s, zs.max(1).values)
        mt_new = torch.maximum(m_t, zt.max(1).values)
        es = zs - ms_new[:, None]
        l_s = l_s * torch.exp(m_s - ms_new) + es.exp().sum(1)
        l_sT = l_sT * torch.exp((m_s - ms_new) / T) + es.div_(T).exp_().sum(1)
        et = (zt - mt_new[:, None]).div_(T).exp_()
        f = torch.exp((m_t - mt_new) / T)
        l_tT = l_tT * f + et.sum(1)
        zt.sub_(zs).nan_to_num_(0.0, 0.0, 0.0)  # masked targets: -inf - -inf; their weight et is 0
        A = A * f + (et * zt).sum(1)
        m_s, m_t = ms_new, mt_new
    return m_s, l_s, l_sT, m_t, l_tT, A


def grad_hat(xs, xt, w, labels, rxs, rxt, rw, lse_s, lse_sT, lse_tT, gr, s, T, alpha, need_dw, target_dw):
    B, C = xs.shape[0], w.shape[0]
    cd = rxs.dtype
    xsh, xth = xs.to(cd) * rxs[:, None], xt.to(cd) * rxt[:, None]
    dxh = torch.zeros_like(xsh)
    dw = torch.empty_like(w) if need_dw else None
    step = chunk_size(2 * B, C)
    for c0 in range(0, C, step):
        c1 = min(C, c0 + step)
        cs = chunk_cos(xsh, w, rw, c0, c1)
        keep = (cs >= -1.0) & (cs <= 1.0)
        zs = cs.clamp_(-1.0, 1.0).mul_(s)
        zt = chunk_cos(xth, w, rw, c0, c1).clamp_(-1.0, 1.0).mul_(s)
        rows, cols = target_mask(labels, c0, c1)
        keep[rows, cols] = False
        # masked entries to -inf before the exps: the un-margined target logits may overflow
        zs.masked_fill_(~keep, -math.inf)
        zt.masked_fill_(~keep, -math.inf)
        q_t = zt.div_(T).sub_(lse_tT[:, None]).exp_()
        q_s = (zs / T).sub_(lse_sT[:, None]).exp_()
        g = zs.sub_(lse_s[:, None]).exp_().mul_(1.0 - alpha).add_(q_s.sub_(q_t), alpha=alpha * T)
        g.mul_(gr[:, None] * s)
        dxh.addmm_(g * rw[None, c0:c1], w[c0:c1].to(cd))
        if need_dw:
            dwh = g.T @ xsh
            dwh.index_add_(0, cols, target_dw(rows))
            normalize_backward(w[c0:c1], dwh, out=dw[c0:c1])
    return dxh, dw


