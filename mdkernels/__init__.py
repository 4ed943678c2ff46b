"""mdkernels: fused margin-softmax and face-recognition distillation kernels for PyTorch."""

from mdkernels import nn, reference
from mdkernels.functional import MarginCEStats, l2_normalize, margin_cross_entropy
from mdkernels.info import info

__version__ = "0.1.0"

__all__ = ["MarginCEStats", "info", "l2_normalize", "margin_cross_entropy", "nn", "reference", "__version__"]
