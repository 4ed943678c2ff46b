"""The k largest cosines between normalised rows, streamed over the gallery: the custom op.

``values[i]``, ``indices[i]``: the ``k`` largest ``<n(q_i), n(g_j)>`` over the gallery rows ``j``, descending (among
equal cosines the smaller gallery index first), with ``n(v) = v / max(|v|, 1e-12)`` (a zero row has cosine 0 with
everything). Both backends stream over gallery chunks (torch) or tiles (Triton) with a running top-k per query,
so the extra memory is one chunk of scores, never ``Q x G``. No gradient: this is search, not a loss.

* ``torch_backend``: ``n(Q) @ G_chunk^T`` in torch, then a C++ sweep per row (``mdkernels._cpu.topk_rows``: one
  comparison per score on the common path, the gallery rows' norms applied in the sweep) where the CPU module is
  built; ``torch.topk`` merges otherwise (the fallback, and what the C++ is tested against).
* ``triton_backend``: one program per (query tile, gallery split); the tile's cosines, then the running top-k
  merged with the tile's best by ``k`` rounds of row maxima (a tile whose best does not beat the current ``k``-th
  is skipped); the splits' candidates merged on the host.
"""

from __future__ import annotations

import torch

from mdkernels._math import compute_dtype
from mdkernels.ops._common import probe
from mdkernels.ops._common.env import ieee_fp32_matmul
from mdkernels.ops.cosine_topk import torch_backend, triton_backend

BACKENDS = {"triton": triton_backend, "torch": torch_backend}
COSINE_TOPK_MAX_K_TRITON = 256  # the Triton kernel keeps k in registers; larger k runs on the torch backend


@torch.library.custom_op("mdkernels::cosine_topk", mutates_args=())
def cosine_topk_op(queries: torch.Tensor, gallery: torch.Tensor, k: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values (Q, k), indices (Q, k))`` with ``k <= G`` already (the public function clamps it)."""
    if backend not in BACKENDS:  # mdkernels.search chose and checked it: it is not asked again here
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    with probe.inside(), ieee_fp32_matmul(queries):
        return BACKENDS[backend].topk(queries, gallery, k)


@cosine_topk_op.register_fake
def _(queries, gallery, k, backend):
    values = queries.new_empty(queries.shape[0], k, dtype=compute_dtype(queries))
    return values, queries.new_empty(queries.shape[0], k, dtype=torch.int64)
