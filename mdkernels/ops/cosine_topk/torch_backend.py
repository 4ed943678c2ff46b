"""Torch backend of the cosine top-k (the CPU path): gallery chunks, the C++ sweep per row where it is built.

Each chunk's GEMM is ``torch.mm``, always: the same inputs, versions and thread count give the same bits, run after
run. An earlier version timed torch's BLAS against numpy's once per shape and kept the faster; under load the
choice flipped, the two round differently, and near-tied identities came back in another order.
``MDK_CPU_GEMM=numpy`` opts into numpy's BLAS (OpenBLAS in the PyPI wheels: on an AMD EPYC about 1.2x faster
than torch's MKL at Q = 2000, 1024 gallery rows, D = 512): a fixed choice, so still reproducible, but its bits
differ from the default's.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from mdkernels._math import compute_dtype
from mdkernels.ops._common import chunked
from mdkernels.ops.l2norm import row_rnorm

CHUNK_ELEMENTS = 1 << 21  # scores per chunk (8 MB in fp32); 1024 gallery rows at Q = 2000, where MKL's GEMM peaked


def chunk_rows(Q: int, G: int, k: int) -> int:
    return max(k, min(G, max(256, CHUNK_ELEMENTS // max(Q, 1))))


def _gemm_torch(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    torch.mm(a, b.T, out=out)


def _gemm_numpy(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    np.matmul(a.numpy(), b.numpy().T, out=out.numpy())  # zero-copy views of CPU tensors


GEMMS = {"torch": _gemm_torch, "numpy": _gemm_numpy}


def cpu_gemm():
    """The chunk GEMM ``out = qn @ chunk^T`` for CPU tensors: torch's, or ``MDK_CPU_GEMM``'s choice. Never timed:
    a choice by measurement would make the results depend on the machine's load."""
    name = os.environ.get("MDK_CPU_GEMM") or "torch"
    if name not in GEMMS:
        raise ValueError(f"MDK_CPU_GEMM must be one of {sorted(GEMMS)}, got {name!r}")
    return GEMMS[name]


def topk(queries: torch.Tensor, gallery: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` ``(Q, k)``, ``k <= G``; see :mod:`mdkernels.ops.cosine_topk.op`."""
    Q, G = queries.shape[0], gallery.shape[0]
    cd = compute_dtype(queries)
    qn = queries.to(cd) * row_rnorm(queries)[:, None]
    rg = row_rnorm(gallery)
    vals = torch.full((Q, k), float("-inf"), dtype=cd, device=queries.device)
    idx = torch.full((Q, k), -1, dtype=torch.int64, device=queries.device)
    if k == 0 or Q == 0:
        return vals, idx
    fused = chunked.fused_epilogue(qn)
    step = chunk_rows(Q, G, k)
    buffer = torch.empty(Q, step, dtype=cd, device=queries.device)  # reused: a new one per chunk would page-fault
    gemm = cpu_gemm() if queries.device.type == "cpu" else _gemm_torch  # one GEMM per device, never timed
    for c0 in range(0, G, step):
        c1 = min(G, c0 + step)
        scores = buffer if c1 - c0 == step else torch.empty(Q, c1 - c0, dtype=cd, device=queries.device)
        gemm(qn, gallery[c0:c1].to(cd), scores)
        if fused:
            rgc = rg[c0:c1]  # bound to names: a temporary would be freed before the call
            chunked.cpu_ext.topk_rows(cd == torch.float64, scores.data_ptr(), rgc.data_ptr(), c0, Q, c1 - c0, k,
                                      vals.data_ptr(), idx.data_ptr(), torch.get_num_threads())  # fmt: skip
            continue
        scores.mul_(rg[None, c0:c1])
        tv, ti = torch.sort(scores, dim=1, descending=True, stable=True)  # ties: the smaller index, as the C++
        vals, idx = merge(torch.cat([vals, tv[:, :k]], 1), torch.cat([idx, ti[:, :k] + c0], 1), k)
    return vals, idx


def merge(vals: torch.Tensor, idx: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best of each row's candidates, by value descending, then gallery index ascending (unfilled
    candidates, index -1, hold -inf: they come last)."""
    by_index = torch.argsort(idx, dim=1, stable=True)
    vals, idx = vals.gather(1, by_index), idx.gather(1, by_index)
    order = torch.argsort(vals, dim=1, descending=True, stable=True)[:, :k]
    return vals.gather(1, order), idx.gather(1, order)
