"""Triplet distillation (Feng et al., docs/math.md §5) without a ``B^3`` tensor.

Student and teacher distances are ``(B, B)`` matrices (the student's through autograd). The loss over
triplets ``(a, p, n)`` is a reduction over ``B^3`` terms; it is streamed:

* ``mining="all"``: two passes over every valid triplet. Pass 1 finds ``d_max`` (the largest teacher
  gap) and the triplet count. Pass 2 sums the hinge ``max(D_ap - D_an + F(d_apn), 0)`` and, in the
  same sweep, the gradient with respect to the ``(B, B)`` student distances: ``+1/N`` at ``(a, p)`` and
  ``-1/N`` at ``(a, n)`` for every active triplet. Torch walks chunks of (anchor, positive) pairs
  against all negatives (a chunk holds at most ``2^20`` terms). Triton sorts the rows by label, so that
  every anchor's positives are one contiguous range, and runs one program per (anchor, tile of its
  positives) or (anchor, tile of n) walking only its positives: pairs x B work, as in torch. Each
  program owns its output slice, so there are no atomics.
* ``"hard"``/``"semihard"``/explicit triplets give at most ``B^2`` triplets; they are mined in anchor
  chunks and the loss is a gather (autograd).
"""

from __future__ import annotations

import torch

from mdkernels._math import THETA_CLAMP, compute_dtype
from mdkernels.ops.l2norm import l2_normalize
from mdkernels.ops.triplet_distill import torch_backend, triton_backend


def pairwise_distance(e: torch.Tensor, distance: str) -> torch.Tensor:
    """All-pairs distances ``(B, B)`` of the normalised rows, differentiable: ``"l2"`` (squared euclidean)
    or ``"angle"`` (radians; the cosine clipped to ``1 - 1e-7`` away from +-1 first)."""
    n = l2_normalize(e.to(compute_dtype(e)))
    cos = n @ n.T
    if distance == "l2":
        return (2 - 2 * cos).clamp_min(0)
    return torch.acos(cos.clamp(-1 + THETA_CLAMP, 1 - THETA_CLAMP))


class TripletAll(torch.autograd.Function):
    """Loss over every valid triplet as a function of the (B, B) student distances."""

    @staticmethod
    def forward(ctx, ds, dt, labels, m_min, m_max, ignore_index, backend):
        impl = triton_backend.all_triplets if backend == "triton" else torch_backend.all_triplets
        loss, grad, _ = impl(ds.detach(), dt, labels, m_min, m_max, ignore_index)
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g, None, None, None, None, None, None

