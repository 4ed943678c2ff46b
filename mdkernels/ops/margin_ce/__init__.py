"""The fused margin-softmax cross-entropy op (docs/math.md §1): ``op`` holds the custom ops and their
autograd; ``triton_backend``, ``cuda_backend`` and ``torch_backend`` the kernels and launchers."""

from mdkernels.ops.margin_ce.op import (
    BACKENDS,
    backward_impl,
    forward_impl,
    margin_ce_backward,
    margin_ce_forward,
    target_coefficient,
)

__all__ = [
    "BACKENDS",
    "backward_impl",
    "forward_impl",
    "margin_ce_backward",
    "margin_ce_forward",
    "target_coefficient",
]
