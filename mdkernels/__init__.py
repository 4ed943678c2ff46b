"""mdkernels: fused margin-softmax and face-recognition distillation kernels for PyTorch."""

from mdkernels import nn, reference
from mdkernels.functional import (
    MarginCEStats,
    angular_distillation_loss,
    l2_normalize,
    margin_cross_entropy,
    margin_distillation_loss,
    margin_kd_loss,
    proxyless_kd_loss,
    triplet_distillation_loss,
)
from mdkernels.info import info

__version__ = "0.1.0"

__all__ = [
    "MarginCEStats",
    "__version__",
    "angular_distillation_loss",
    "info",
    "l2_normalize",
    "margin_cross_entropy",
    "margin_distillation_loss",
    "margin_kd_loss",
    "nn",
    "proxyless_kd_loss",
    "reference",
    "triplet_distillation_loss",
]
