"""Gradient pieces shared by the margin ops: the embeddings' gradient from the forward's accumulator, and
the scale of the 16-bit gradient operand."""

from __future__ import annotations

import torch

from mdkernels.ops.l2norm import normalize_backward


def grad_scale(gr: torch.Tensor, coef: torch.Tensor, s: float) -> torch.Tensor:
    """A one-element device tensor (no host sync) that bounds ``|G| / scale`` by ``s`` (``s`` times a KD
    weight for margin KD): ``max(max |gr|, max |coef| / s)``. The center-gradient kernels use ``G / scale``
    as their 16-bit operand and multiply the fp32 sums back: with G itself, fp16 would flush 1/B-sized terms
    to zero, and the exact target derivative near ``theta = 0`` (about ``s sin(m) / theta``) could overflow."""
    if gr.numel() == 0:
        return torch.ones(1, dtype=torch.float32, device=gr.device)
    bound = torch.maximum(gr.abs().amax(), coef.abs().amax() / s).float()
    return bound.clamp_min(torch.finfo(torch.float32).tiny).reshape(1)


def embedding_grad(x, w, o_bar, gr, coef, labels_k, rw):
    """``dL/dx`` without a GEMM: ``dL/dn(x_i) = gr_i o_bar_i + coef_i n(w_{y_i})``, then the normalisation
    backward. Rows with ``labels_k < 0`` (and centers without rows: an empty shard) add no target term."""
    dxh = o_bar * gr[:, None]
    if w.shape[0]:
        safe = labels_k.clamp_min(0)
        dxh += coef[:, None] * (w[safe].to(dxh.dtype) * rw[safe, None])
    return normalize_backward(x, dxh)
