"""mdkernels: fused margin-softmax and face-recognition distillation kernels for PyTorch."""

import torch as _torch

from mdkernels import _floor

_floor.check(_torch.__version__, _floor.installed_triton())  # older torch or Triton: an ImportError naming the floor

from mdkernels import nn, reference  # noqa: E402
from mdkernels._validate import check_values  # noqa: E402
from mdkernels.functional import (  # noqa: E402
    MarginCEStats,
    adadistill_loss,
    angular_distillation_loss,
    cosine_topk_search,
    l2_normalize,
    margin_cross_entropy,
    margin_distillation_loss,
    margin_kd_loss,
    proxyless_kd_loss,
    triplet_distillation_loss,
)
from mdkernels.info import info  # noqa: E402
from mdkernels.optim import CenterUpdateHandle, fuse_center_update  # noqa: E402

cosine_topk = cosine_topk_search  # mdkernels.cosine_topk(queries, gallery, k): the name the docs use

__version__ = "0.1.0"

__all__ = [
    "CenterUpdateHandle",
    "MarginCEStats",
    "__version__",
    "adadistill_loss",
    "check_values",
    "angular_distillation_loss",
    "cosine_topk",
    "cosine_topk_search",
    "fuse_center_update",
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
