"""Angular distillation (ShrinkTeaNet, docs/math.md §4), fused: ``op`` holds the custom ops and their
autograd; ``triton_backend``, ``cuda_backend`` and ``torch_backend`` the row kernels."""

from mdkernels.ops.angular_distill.op import angular_distill_backward, angular_distill_forward, rows_of

__all__ = ["angular_distill_backward", "angular_distill_forward", "rows_of"]
