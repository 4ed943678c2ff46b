"""Pieces shared by the margin ops' kernel launchers: the merge of split-C forward partials, the
embeddings' gradient from the forward's accumulator, and the scale of the 16-bit gradient operand."""

from __future__ import annotations

import torch

from mdkernels.ops.l2norm import normalize_backward


def merge_splits(m: torch.Tensor, l: torch.Tensor, o: torch.Tensor | None, s: float):
    """``(lse_nt, o_bar)`` from per-split partials, as flash-decoding merges them: ``m, l`` (splits, B) are
    each split's running max and rescaled sum of ``exp``, ``o`` (splits, B, D) its unnormalised accumulator
    (None when the forward skipped it). ``o_bar = s * sum_k e^(m_k - M) o_k / total`` (0 for empty rows)."""
    m_max = m.max(0).values
    scale = torch.exp(m - m_max)
    total = (l * scale).sum(0)
    lse_nt = m_max + torch.log(total)
    if o is None:
        return lse_nt, None
    o = (o * scale[:, :, None]).sum(0)  # elementwise, not a GEMM: no TF32 whatever torch's flags say
    return lse_nt, o * torch.where(total > 0, s / total, torch.zeros_like(total))[:, None]


def grad_scale(gr: torch.Tensor, coef: torch.Tensor, s: float) -> torch.Tensor:
    """A one-element device tensor (no host sync) that bounds ``|G| / scale`` by ``s`` (``s`` times a KD
    weight for margin KD): ``max(max |gr|, max |coef| / s)``. The center-gradient kernels use ``G / scale``
    as their 16-bit operand and multiply the fp32 sums back: with G itself, fp16 would flush 1/B-sized terms
    to zero, and the exact target derivative near ``theta = 0`` (about ``s sin(m) / theta``) could overflow."""
    if gr.numel() == 0:
        return torch.ones(1, dtype=torch.float32, device=gr.device)
    bound = torch.maximum(gr.abs().amax(), coef.abs().amax() / s).float()
    return bound.clamp_min(torch.finfo(torch.float32).tiny).reshape(1)


def embedding_grad(x, w, o_bar, gr, coef, labels_k, rw, use_cuda=False):
    """``dL/dx`` without a GEMM: ``dL/dn(x_i) = gr_i o_bar_i + coef_i n(w_{y_i})``, then the normalisation
    backward (the CUDA row kernel only for ``backend="cuda"``: ``use_cuda``). Rows with ``labels_k < 0`` (and
    centers without rows: an empty shard) add no target term."""
    dxh = o_bar * gr[:, None]
    if w.shape[0]:
        safe = labels_k.clamp_min(0)
        dxh += coef[:, None] * (w[safe].to(dxh.dtype) * rw[safe, None])
    return normalize_backward(x, dxh, use_cuda=use_cuda)
