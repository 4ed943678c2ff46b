"""Torch backend of the fused margin CE (the CPU path): the flash-style algorithm, one class chunk at a time.

Forward, per chunk of centers: the ``(B, n)`` logits ``s*c`` (targets masked), an online max and sum-exp
per row and, when the embeddings need a gradient, ``O_i = sum_j exp(z_ij - m_i) n(w_j)`` over the entries
that pass a gradient, rescaled whenever a row's max grows (flash attention's ``O`` with ``K = V = n(W)``).
The backward then needs no GEMM for ``dx``. Backward, only for trainable centers: each chunk's logits
again, ``G = dL/dc`` with the target term folded in, and the chunk's rows of ``dW`` finished (normalisation
backward) and written once. Frozen centers: two GEMMs per step in all (D
is never split here: the floor of docs/design.md's GEMM table).

:mod:`mdkernels.ops.margin_ce.cpu_epilogue` fuses each chunk's elementwise passes in C++ where the CPU
module was built; the pure-torch passes below are the fallback and the reference for it.
"""

from __future__ import annotations

import torch

from mdkernels.ops._common import chunked
from mdkernels.ops._common.env import NEG_BIG
from mdkernels.ops._common.margin import NonTarget


def forward(x, w, labels, rx, rw, s, nt: NonTarget, need_o, op_dtype=None):
    """``(lse_nt, o)``: the logsumexp of the non-target logits ``(B,)`` and, when ``need_o``,
    ``o_i = sum_j softmax_nt(z_i)_j (dz/dc)_ij n(w_j)`` over the entries that pass a gradient ``(B, D)``
    (``n(w_j)`` of the sub-center each class's cosine came from). Any strides. ``op_dtype`` (autocast) is
    not used: this backend computes in fp32, the GPU path's result less its 16-bit operand rounding."""
    B, C = x.shape[0], w.shape[0] // nt.K
    cd = rx.dtype
    xs = x.to(cd) * (rx * s)[:, None]  # s * n(x): a chunk's product scaled by 1/|w_j| is s*c
    m = torch.full((B,), NEG_BIG, dtype=cd, device=x.device)
    l = torch.zeros(B, dtype=cd, device=x.device)
    o = torch.zeros(B, x.shape[1], dtype=cd, device=x.device) if need_o else None
    fused = nt.plain and chunked.fused_epilogue(xs)
    alpha = torch.empty_like(m)
    for c0, c1 in chunked.chunks(B * nt.K, C):
        r0, r1 = c0 * nt.K, c1 * nt.K  # the chunk's weight rows
        if fused:  # one C++ sweep per row: (m, l) updated in place, P * rw in place of the logits
            p = torch.mm(xs, w[r0:r1].to(cd).T)
            tgt = chunked.chunk_targets(labels, c0, c1)  # bound to a name: a temporary would be freed first
            chunked.cpu_ext.forward_rows(cd == torch.float64, p.data_ptr(), rw[r0:r1].data_ptr(), tgt.data_ptr(), B,
                                         r1 - r0, float(s), float(s * nt.tau) if nt.tau is not None else 0.0,
                                         nt.tau is not None, m.data_ptr(), l.data_ptr(), alpha.data_ptr(), need_o,
                                         torch.get_num_threads())  # fmt: skip
        else:
            ch = chunked.chunk_logits(xs, w, rw, labels, c0, c1, s, nt)
            m_new = torch.maximum(m, ch.mx)
            torch.exp(m - m_new, out=alpha)
            p = ch.z.sub_(m_new[:, None]).exp_()
            l.mul_(alpha).add_(p.sum(1))
            if need_o:
                if ch.keep is not None:
                    p.masked_fill_(~ch.keep, 0.0)
                if ch.slope is not None:
                    p.mul_(ch.slope)
                p = chunked.spread(p, ch.kidx, nt.K).mul_(rw[None, r0:r1])
            m = m_new
        if need_o:
            o.mul_(alpha[:, None]).addmm_(p, w[r0:r1].to(cd))
    lse_nt = m + torch.log(l)
    if need_o:
        o.mul_(torch.where(l > 0, s / l, torch.zeros_like(l))[:, None])
    return lse_nt, o


def center_grad(x, w, labels, rx, rw, lse, gr, coef, raw_t, s, nt: NonTarget, op_dtype=None, step=None):
    """``dL/dW`` (C K, D) in the centers' dtype, written once per chunk (:func:`chunked.center_grad`), with
    the non-target ``dL/dc = gr s exp(z - lse) (dz/dc)/s``. With ``step`` (the fused center update), each chunk's
    gradient is applied to its rows instead (returns None)."""
    xs = x.to(rx.dtype) * (rx * s)[:, None]
    return chunked.center_grad(xs, w, rw, labels, gr, coef, raw_t, s, nt, lse=lse, step=step)
