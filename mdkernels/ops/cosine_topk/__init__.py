"""Cosine top-k (identification against a gallery) without a ``Q x G`` tensor: see :mod:`.op`."""

from mdkernels.ops.cosine_topk.op import COSINE_TOPK_MAX_K_TRITON, cosine_topk_op

__all__ = ["COSINE_TOPK_MAX_K_TRITON", "cosine_topk_op"]
