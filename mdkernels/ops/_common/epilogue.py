"""Gradient epilogues shared by the margin ops: the target term and the normalisation backward."""

from __future__ import annotations

import torch

from mdkernels.ops.l2norm import normalize_backward


def grad_scale(gr: torch.Tensor) -> torch.Tensor:
    """``max |gr|`` as a one-element device tensor (no host sync). The backward kernels form
    ``G / max|gr|`` (entries bounded by s, or s((1 - alpha) + alpha T) for KD) and multiply it with the
    normalised tiles, every operand bounded, then scale the fp32 sums back: with G itself, fp16 operands
    would flush 1/B-sized gradient terms to zero."""
    if gr.numel() == 0:
        return torch.ones(1, dtype=torch.float32, device=gr.device)
    return gr.abs().amax().float().clamp_min(torch.finfo(torch.float32).tiny).reshape(1)



def finish_center_grad(w, dwh, safe, coef, xh):
    """Kernel backends' dW epilogue: add the per-row target term ``coef_i n(x_i)`` to row ``y_i`` of the
    fp32 ``dW^`` buffer, then the normalisation backward (in place when the dtypes allow)."""
    dwh.index_add_(0, safe, coef[:, None] * xh)
    return normalize_backward(w, dwh, out=dwh if dwh.dtype == w.dtype else None)


def finish_embedding_grad(x, dxh, w, safe, rw, coef):
    """Every backend's dx epilogue: add the per-row target term ``coef_i n(w_{y_i})`` to ``dx^``, then the
    normalisation backward. Centers without rows (an empty shard) contribute no target term."""
    if w.shape[0]:
        dxh += coef[:, None] * (w[safe].to(dxh.dtype) * rw[safe, None])
    return normalize_backward(x, dxh)


