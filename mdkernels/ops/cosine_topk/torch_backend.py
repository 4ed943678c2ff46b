"""Torch backend of the cosine top-k (the CPU path): gallery chunks, the C++ sweep per row where it is built.

On the CPU each chunk's GEMM runs through the faster of two BLAS libraries, timed once per process and shape:
torch's (MKL in the PyPI wheels) or numpy's (OpenBLAS). On an AMD EPYC numpy's measured 1.2x faster at Q = 2000,
1024 gallery rows, D = 512 (MKL's code path on AMD CPUs is not its fastest); on Intel CPUs MKL usually wins.
``MDK_CPU_GEMM=torch|numpy`` forces one.
"""

from __future__ import annotations

import os
import time

import numpy as np
import torch

from mdkernels._spec import compute_dtype
from mdkernels.ops._common import chunked
from mdkernels.ops.l2norm import row_rnorm

CHUNK_ELEMENTS = 1 << 21  # scores per chunk (8 MB in fp32); 1024 gallery rows at Q = 2000, where MKL's GEMM peaked


def chunk_rows(Q: int, G: int, k: int) -> int:
    return max(k, min(G, max(256, CHUNK_ELEMENTS // max(Q, 1))))


_GEMM: dict[tuple, str] = {}


def _gemm_torch(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    torch.mm(a, b.T, out=out)


def _gemm_numpy(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    np.matmul(a.numpy(), b.numpy().T, out=out.numpy())  # zero-copy views of CPU tensors


GEMMS = {"torch": _gemm_torch, "numpy": _gemm_numpy}


def cpu_gemm(qn: torch.Tensor, gallery: torch.Tensor, out: torch.Tensor):
    """The chunk GEMM ``out = qn @ chunk^T`` for CPU tensors: the faster of torch's and numpy's BLAS on this
    machine for this shape (timed once, three calls each), or ``MDK_CPU_GEMM``'s choice."""
    forced = os.environ.get("MDK_CPU_GEMM")
    if forced:
        if forced not in GEMMS:
            raise ValueError(f"MDK_CPU_GEMM must be one of {sorted(GEMMS)}, got {forced!r}")
        return GEMMS[forced]
    key = (qn.shape[0], out.shape[1], qn.shape[1], qn.dtype, torch.get_num_threads())
    if key not in _GEMM:
        chunk = gallery[: out.shape[1]].to(qn.dtype)
        best = {}
        for name, fn in GEMMS.items():
            fn(qn, chunk, out)  # warm-up (threads, pages)
            t0 = time.perf_counter()
            for _ in range(3):
                fn(qn, chunk, out)
            best[name] = time.perf_counter() - t0
        _GEMM[key] = min(best, key=best.get)
    return GEMMS[_GEMM[key]]


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
    gemm = cpu_gemm(qn, gallery, buffer) if fused else _gemm_torch
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
