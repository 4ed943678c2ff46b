"""Angular distillation (ShrinkTeaNet, docs/math.md §4): ``mean_i (1 - <n(s_i), n(t_i)>)^p``, fused.

One row kernel per direction: forward reads each student and teacher row once, accumulating
``|s|^2``, ``|t|^2`` and ``<s, t>`` in fp32, and writes the row loss plus three ``(R,)`` statistics;
backward reads both rows once more and writes ``ds``:

    d loss_i / d s_i = -p (1 - cos_i)^(p-1) * (t_i/|t_i| - cos_i s_i/|s_i|) / |s_i|

(``n(s) = s/eps`` is linear where ``|s| < eps``: then ``dcos/ds = n(t)/eps``). The teacher gets no
gradient. Backends: ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``) and ``"torch"``.
"""

from __future__ import annotations

import torch

from mdkernels._math import compute_dtype
from mdkernels.ops._common import probe
from mdkernels.ops.angular_distill import cuda_backend, torch_backend, triton_backend

IMPLS = {"triton": triton_backend, "cuda": cuda_backend, "torch": torch_backend}


@torch.library.custom_op("mdkernels::angular_distill_forward", mutates_args=())
def angular_distill_forward(
    s: torch.Tensor, t: torch.Tensor, p: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row losses ``(1 - cos)^p`` and the statistics ``(|s|, |t|, cos)``, all ``(R,)``."""
    with probe.inside():
        return IMPLS[backend].forward(s.contiguous(), t.contiguous(), p)


@angular_distill_forward.register_fake
def _(s, t, p, backend):
    row = s.new_empty(s.shape[0], dtype=compute_dtype(s))
    return row, torch.empty_like(row), torch.empty_like(row), torch.empty_like(row)


@torch.library.custom_op("mdkernels::angular_distill_backward", mutates_args=())
def angular_distill_backward(
    g: torch.Tensor, s: torch.Tensor, t: torch.Tensor, ns: torch.Tensor, nt: torch.Tensor, cos: torch.Tensor,
    p: float, backend: str,
) -> torch.Tensor:  # fmt: skip
    """``d loss / d s`` from the forward's statistics; the teacher gets no gradient."""
    with probe.inside():
        s, t, g = s.contiguous(), t.contiguous(), g.contiguous().to(ns.dtype)
        return IMPLS[backend].backward(g, s, t, ns, nt, cos, p)


@angular_distill_backward.register_fake
def _(g, s, t, ns, nt, cos, p, backend):
    return torch.empty_like(s)


def _setup_context(ctx, inputs, output):
    s, t, p, backend = inputs
    _, ns, nt, cos = output
    ctx.save_for_backward(s, t, ns, nt, cos)
    ctx.args = (p, backend)
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, g, *_unused):
    s, t, ns, nt, cos = ctx.saved_tensors
    p, backend = ctx.args
    ds = angular_distill_backward(g, s, t, ns, nt, cos, p, backend) if ctx.needs_input_grad[0] else None
    return ds, None, None, None


torch.library.register_autograd("mdkernels::angular_distill_forward", _backward, setup_context=_setup_context)


def rows_of(x: torch.Tensor, per: str) -> torch.Tensor:
    """(R, K) rows compared by the loss: embeddings as they are; feature maps per sample (flattened) or
    per spatial position (channel vectors; a copy unless the map is channels_last)."""
    if x.dim() == 2:
        return x
    if x.dim() != 4:
        raise ValueError(f"angular distillation takes (B, D) embeddings or (B, C, H, W) maps, got {tuple(x.shape)}")
    if per == "sample":
        return x.reshape(x.shape[0], -1)
    if per == "position":
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    raise ValueError(f"per must be 'sample' or 'position', got {per!r}")
