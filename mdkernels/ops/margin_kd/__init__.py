"""Hinton KD on margin logits (docs/math.md §6), fused: ``op`` holds the custom ops and their autograd;
``triton_backend`` and ``torch_backend`` the kernels."""

from mdkernels.ops.margin_kd.op import backward_impl, forward_impl, margin_kd_backward, margin_kd_forward

__all__ = ["backward_impl", "forward_impl", "margin_kd_backward", "margin_kd_forward"]
