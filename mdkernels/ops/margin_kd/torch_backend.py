"""Torch backend of the fused margin KD (the CPU path): the flash-style algorithm, one class chunk at a time.

Forward, per chunk: the student's and the teacher's ``(B, n)`` logits against the same centers, the six
online statistics of :mod:`mdkernels.ops.margin_kd.op` and, when the student needs a gradient, the three
accumulators ``sum_j exp(z_s - m_s) n(w_j)``, ``sum_j exp((z_s - m_s)/T) n(w_j)`` and
``sum_j exp((z_t - m_t)/T) n(w_j)`` as one ``(3B, n) . (n, D)`` product. Backward, only for trainable
centers: both chunks' logits again and the chunk's ``dW``, written once.
"""

from __future__ import annotations

import torch

from mdkernels.ops._common import chunked
from mdkernels.ops._common.env import NEG_BIG


def forward(xs, xt, w, labels, rxs, rxt, rw, s, T, need_o, op_dtype=None):
    """``(stats, o3)``: ``stats = (m_s, l_s, l_sT, m_t, l_tT, A)`` over the non-target classes, each
    ``(B,)``; ``o3: (3, B, D)`` the accumulators relative to ``m_s``, ``m_s / T`` and ``m_t / T`` (None
    without ``need_o``)."""
    B, C = xs.shape[0], w.shape[0]
    cd = rxs.dtype
    ss, st = xs.to(cd) * (rxs * s)[:, None], xt.to(cd) * (rxt * s)[:, None]
    m_s = torch.full((B,), NEG_BIG, dtype=cd, device=xs.device)
    m_t = m_s.clone()
    l_s, l_sT, l_tT, A = (torch.zeros(B, dtype=cd, device=xs.device) for _ in range(4))
    o3 = torch.zeros(3 * B, xs.shape[1], dtype=cd, device=xs.device) if need_o else None
    for c0, c1 in chunked.chunks(4 * B, C):  # two logit chunks, and the three stacked P's
        cs, ct = chunked.chunk_logits(ss, w, rw, labels, c0, c1, s), chunked.chunk_logits(st, w, rw, labels, c0, c1, s)
        zs, mxs, keep, zt, mxt = cs.z, cs.mx, cs.keep, ct.z, ct.mx
        ms_new, mt_new = torch.maximum(m_s, mxs), torch.maximum(m_t, mxt)
        a_s, a_sT, a_tT = torch.exp(m_s - ms_new), torch.exp((m_s - ms_new) / T), torch.exp((m_t - mt_new) / T)
        es = zs - ms_new[:, None]
        esT = (es / T).exp_()
        es.exp_()
        etT = (zt - mt_new[:, None]).div_(T).exp_()
        l_s = l_s * a_s + es.sum(1)
        l_sT = l_sT * a_sT + esT.sum(1)
        l_tT = l_tT * a_tT + etT.sum(1)
        A = A * a_tT + (etT * zt.sub_(zs).nan_to_num_(0.0, 0.0, 0.0)).sum(1)  # targets: -inf - -inf, weight 0
        if need_o:
            p3 = torch.cat([es, esT, etT])
            if keep is not None:
                p3.masked_fill_(~keep.repeat(3, 1), 0.0)
            alphas = torch.cat([a_s, a_sT, a_tT])
            o3.mul_(alphas[:, None]).addmm_(p3.mul_(rw[None, c0:c1]), w[c0:c1].to(cd))
        m_s, m_t = ms_new, mt_new
    return (m_s, l_s, l_sT, m_t, l_tT, A), (o3.view(3, B, -1) if need_o else None)


def center_grad(xs, xt, w, labels, rxs, rxt, rw, lse_s, lse_sT, lse_tT, gr, coef, raw_t, s, T, alpha, op_dtype=None):
    """``dL/dW`` (C, D) in the centers' dtype: the non-target ``dL/dc_s / (gr s) = (1-a) p_s + a T (q_s -
    q_t)``, the teacher's chunk recomputed alongside (:func:`chunked.center_grad`)."""
    cd = rxs.dtype
    ss, st = xs.to(cd) * (rxs * s)[:, None], xt.to(cd) * (rxt * s)[:, None]

    def nontarget(zs, c0, c1):
        zt = chunked.chunk_logits(st, w, rw, labels, c0, c1, s).z
        q_t = zt.div_(T).sub_(lse_tT[:, None]).exp_()
        q_s = (zs / T).sub_(lse_sT[:, None]).exp_()
        return torch.sub(zs, lse_s[:, None]).exp_().mul_(1.0 - alpha).add_(q_s.sub_(q_t), alpha=alpha * T)

    return chunked.center_grad(ss, w, rw, labels, gr, coef, raw_t, s, nontarget=nontarget, logit_sets=3)
