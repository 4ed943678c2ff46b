"""Triplet distillation (Feng et al., docs/math.md §5) without a ``B^3`` tensor: ``op`` holds the autograd
and the distances; ``triton_backend`` and ``torch_backend`` the streamed "all" mining and the miners."""

from mdkernels.ops.triplet_distill.op import TripletAll, pairwise_distance

__all__ = ["TripletAll", "pairwise_distance"]
