"""The cosine top-k, exactly: the oracle of :func:`mdkernels.cosine_topk` (docs/math.md §9). It materialises the
``Q x G`` cosines on purpose."""

from __future__ import annotations

import torch

from mdkernels.reference.core import normalize


def cosine_topk(queries: torch.Tensor, gallery: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` ``(Q, min(k, G))``: the largest ``<n(q_i), n(g_j)>`` per query, descending, equal
    cosines by gallery index ascending (a stable sort), zero rows giving 0."""
    cos = normalize(queries) @ normalize(gallery).T
    order = torch.argsort(cos, dim=1, descending=True, stable=True)[:, : min(k, gallery.shape[0])]
    return cos.gather(1, order), order


__all__ = ["cosine_topk"]
