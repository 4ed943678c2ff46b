"""Search: the k nearest gallery rows of each query by cosine (identification against a gallery of millions),
validated here and run by :mod:`mdkernels.ops.cosine_topk`."""

from __future__ import annotations

import torch

from mdkernels import _validate as V
from mdkernels import backends, reference
from mdkernels.ops import cosine_topk


def cosine_topk_search(
    queries: torch.Tensor, gallery: torch.Tensor, k: int, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest cosines of each query against the gallery, streamed: memory independent of
    ``G`` (docs/design.md, "Memory").

    queries: (Q, D); gallery: (G, D), any scale (rows are normalised here; a zero row has cosine 0 with every
    row). Returns ``(values (Q, k'), indices (Q, k'))`` with ``k' = min(k, G)``: the cosines ``<n(q_i), n(g_j)>``
    in descending order (equal cosines: the smaller gallery index first) and their gallery rows (int64), in fp32
    (fp64 for fp64 inputs). No gradient. Backends: ``"triton"`` (GPU, or the interpreter; k up to 256),
    ``"torch"`` (gallery chunks, the CPU default, any k), ``"reference"`` (the exact ``topk(n(Q) @ n(G)^T)``,
    which materialises ``Q x G``); ``"auto"`` picks Triton on a GPU (torch above k = 256) and torch on the CPU.
    """
    V.check_matrix(queries, "queries")
    V.check_matrix(gallery, "gallery", cols=queries.shape[1])
    V.check_same(queries, gallery, "queries", "gallery")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1 (how many gallery rows per query), got {k!r}")
    if gallery.shape[0] == 0:
        raise ValueError("gallery has no rows: there is nothing to search")
    large = k > cosine_topk.COSINE_TOPK_MAX_K_TRITON
    if backend == "auto" and large:
        backend = "torch"
    backend = backends.resolve("cosine_topk", backend, queries, (queries.shape[0], gallery.shape[0], queries.shape[1]),
                               large_k=large)  # fmt: skip
    k = min(k, gallery.shape[0])
    if backend == "reference":
        return reference.cosine_topk(queries, gallery, k)
    with torch.no_grad():
        return cosine_topk.cosine_topk_op(queries.detach(), gallery.detach(), k, backend)
