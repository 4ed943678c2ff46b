"""Triton backend of the cosine top-k (see :mod:`mdkernels.ops.cosine_topk.op`).

``_cosine_topk_kernel``: one program per (query tile, gallery split). The query tile is normalised once (resident
over all of D up to ``full_d``, else stepped with the gallery tile); per gallery tile, the cosines (masked to
``-inf`` outside the split), and, when the tile's best beats some row's current ``k``-th, the merge: ``k`` rounds
that each take the larger of the running list's and the tile's row maxima (the running list wins ties: it holds
earlier gallery rows; ``argmax`` takes the leftmost). Each program writes its split's ``k`` candidates; the host
merges the splits (by value, then by gallery index).
"""

from __future__ import annotations

import torch

from mdkernels._cuda_ext import guard_device
from mdkernels._math import compute_dtype
from mdkernels.ops._common.env import HAS_TRITON, LAUNCH_OPTIONS, gpu_like, gpu_tiles, num_sms, ptr
from mdkernels.ops._common.tiles import triton_flags
from mdkernels.ops.cosine_topk.torch_backend import merge

if HAS_TRITON:
    import triton
    import triton.language as tl

    from mdkernels.ops._common.tiles import cos_tile, load_tile, normalised

    @triton.jit(do_not_specialize=("Qn", "Gn", "per_split", "K"))  # loop bounds and masks: any value, one kernel
    def _cosine_topk_kernel(
        QP, GP, RQ, RG, VALS, IDX, Qn, Gn, D, stride_q, stride_qc, stride_g, stride_gc, per_split, K,
        KP: tl.constexpr, FULL_D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_G: tl.constexpr,
        BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr, OP_DTYPE: tl.constexpr, ROUND: tl.constexpr,
        PRECISION: tl.constexpr,
    ):  # fmt: skip
        """VALS/IDX[split, row, 0:K]: the split's K best cosines of each query row, descending. ``K`` is a runtime
        integer (one compiled kernel per ``KP = next_pow2(K)``, not one per k): the merge loop is not unrolled."""
        pid_q = tl.program_id(0)
        pid_s = tl.program_id(1)
        rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
        row_mask = rows < Qn
        slots = tl.arange(0, KP)
        g_begin = pid_s * per_split
        g_end = tl.minimum(g_begin + per_split, Gn)
        if FULL_D:
            dd = tl.arange(0, BLOCK_D)
            rq = tl.load(RQ + rows, mask=row_mask, other=0.0)
            qn = normalised(load_tile(QP, rows, row_mask, dd, dd < D, stride_q, stride_qc), rq, OP_DTYPE, ROUND)
        vals = tl.where(slots[None, :] < K, float("-inf"), float("inf")) + tl.zeros((BLOCK_Q, KP), ACC_DTYPE)
        idx = tl.full((BLOCK_Q, KP), -1, tl.int32)  # a gallery of fewer than 2^31 rows
        for g0 in range(g_begin, g_end, BLOCK_G):
            cols = g0 + tl.arange(0, BLOCK_G)
            col_mask = cols < g_end
            if FULL_D:
                rg = tl.load(RG + cols, mask=col_mask, other=0.0)
                gn = normalised(load_tile(GP, cols, col_mask, dd, dd < D, stride_g, stride_gc), rg, OP_DTYPE, ROUND)
                cos = tl.dot(qn, tl.trans(gn), input_precision=PRECISION, out_dtype=ACC_DTYPE)
            else:
                cos = cos_tile(QP, GP, RQ, RG, rows, cols, row_mask, col_mask, D, stride_q, stride_qc, stride_g,
                               stride_gc, BLOCK_Q, BLOCK_G, BLOCK_D, ACC_DTYPE, OP_DTYPE, ROUND,
                               PRECISION)  # fmt: skip
            cos = tl.where(col_mask[None, :], cos, float("-inf"))
            worst = tl.min(tl.where(slots[None, :] < K, vals, float("inf")), 1)  # each row's K-th so far
            if tl.max(tl.max(cos, 1) - worst, 0) > 0:  # some row's K-th is beaten: merge
                run = tl.where(slots[None, :] < K, vals, float("-inf"))
                new_vals = vals
                new_idx = idx
                for j in range(K):
                    best_r = tl.max(run, 1)
                    at_r = tl.argmax(run, 1)
                    best_t = tl.max(cos, 1)
                    at_t = tl.argmax(cos, 1)
                    take_t = best_t > best_r  # equal: the running list's (earlier) row stays ahead
                    pick_r = slots[None, :] == at_r[:, None]
                    pick_t = tl.arange(0, BLOCK_G)[None, :] == at_t[:, None]
                    from_r = tl.sum(tl.where(pick_r, idx, 0), 1)
                    here = slots[None, :] == j
                    new_vals = tl.where(here, tl.where(take_t, best_t, best_r)[:, None], new_vals)
                    new_idx = tl.where(here, tl.where(take_t, g0 + at_t, from_r)[:, None], new_idx)
                    run = tl.where(pick_r & ~take_t[:, None], float("-inf"), run)
                    cos = tl.where(pick_t & take_t[:, None], float("-inf"), cos)
                vals = new_vals
                idx = new_idx
        out = (pid_s * Qn + rows[:, None]).to(tl.int64) * K + slots[None, :]
        keep = row_mask[:, None] & (slots[None, :] < K)
        tl.store(VALS + out, vals, mask=keep)
        tl.store(IDX + out, idx.to(tl.int64), mask=keep)


FORCE_SPLITS: int | None = None  # tests: force this many gallery splits on any device


def tile_config(dtype: torch.dtype, D: int, k: int = 10, arch: int | None = 80) -> dict:
    """BLOCK_Q, BLOCK_G, BLOCK_D, FULL_D, num_warps: the interpreter's few large tiles, or a GPU's: the running
    list (BLOCK_Q x next_pow2(k) values and indices) shares the registers with the cosine tile, so the query
    tile shrinks as k grows (64-row wgmma tiles for 16-bit on sm_90 for k up to 16); D resident up to 256 columns
    (16-bit) or 128 (fp32, fp64), else a D loop; a D that is not a multiple of 16 loads element by element and
    takes narrower steps. Chosen so that every tile compiles without a spill on sm_80 to sm_120 (the compile
    check, mdkernels.tools.gpu_compile)."""
    d_pad = triton.next_power_of_2(max(D, 16))
    if not gpu_tiles():
        return dict(BLOCK_Q=32, BLOCK_G=128, BLOCK_D=d_pad if d_pad <= 512 else 128, FULL_D=d_pad <= 512,
                    num_warps=4)  # fmt: skip
    kp = triton.next_power_of_2(max(k, 1))
    arch = arch or 0
    half = dtype in (torch.float16, torch.bfloat16)
    aligned = D % 16 == 0
    # fp32 at 256 resident columns spilled 0.3-0.6 KB and needed 130 KiB of shared memory on sm_80 (Triton 3.9)
    full = d_pad <= (256 if half and aligned else 128)
    # 64-row wgmma tiles for 16-bit on sm_90 only: fp32 spilled there (Triton 3.6), the 64-row tiles on sm_100
    # spilled in fp32 (Triton 3.9) and failed to compile in 16-bit (Triton 3.6's PassManager)
    wide = half and 90 <= arch < 100 and aligned  # an odd D's element-wise loads spilled 0.6 KB at 64 rows
    block_q = (64 if wide else 32) if kp <= 16 else (32 if kp <= 64 else 16)
    # 16-bit at 8 warps spills on sm_80; from sm_100 on, ptxas capped the 4-warp tile at 128 registers and spilled
    warps = 4 if half and kp <= 16 and arch < 100 else 8
    # the D loop's step: 64 columns, 32 for fp32 at k <= 16 (64 spilled, Triton 3.8) and for an odd D (one address
    # per element: 64 spilled 8-80 B on sm_80 and sm_86, Triton 3.9)
    block_d = d_pad if full else (32 if (not half and kp <= 16) or not aligned else 64)
    if dtype == torch.float64:  # a checking mode; no fp64 tensor cores on sm_86/89/120 (FMA dots spilled 0.2-5 KB on
        # sm_89 at 16 x 64 tiles, Triton 3.9): small tiles, D always in steps of 16
        return dict(BLOCK_Q=16, BLOCK_G=32, BLOCK_D=16, FULL_D=False, num_warps=8 if kp > 64 else 4)  # the list
    return dict(BLOCK_Q=block_q, BLOCK_G=64, BLOCK_D=block_d, FULL_D=full, num_warps=warps)


@guard_device
def topk(queries: torch.Tensor, gallery: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, indices)`` ``(Q, k)``, ``k <= G``; see :mod:`mdkernels.ops.cosine_topk.op`."""
    from mdkernels.ops._common.env import capability
    from mdkernels.ops.l2norm import row_rnorm

    Q, D = queries.shape
    G = gallery.shape[0]
    cd = compute_dtype(queries)
    if k == 0 or Q == 0:
        return queries.new_empty(Q, k, dtype=cd), queries.new_empty(Q, k, dtype=torch.int64)
    cfg = tile_config(queries.dtype, D, k, capability(queries.device))
    warps = cfg.pop("num_warps")
    row_tiles, g_tiles = triton.cdiv(Q, cfg["BLOCK_Q"]), triton.cdiv(G, cfg["BLOCK_G"])
    if FORCE_SPLITS is not None:
        splits = max(1, min(g_tiles, FORCE_SPLITS))
    else:
        splits = max(1, min(g_tiles, (4 * num_sms(queries.device)) // row_tiles)) if gpu_like(queries) else 1
    per_split = triton.cdiv(g_tiles, splits) * cfg["BLOCK_G"]
    splits = triton.cdiv(G, per_split)
    vals = torch.empty(splits, Q, k, dtype=cd, device=queries.device)
    idx = torch.empty(splits, Q, k, dtype=torch.int64, device=queries.device)
    rq, rg = row_rnorm(queries), row_rnorm(gallery)
    _cosine_topk_kernel[(row_tiles, splits)](
        queries, gallery, rq, rg, vals, idx, Q, G, D, queries.stride(0), queries.stride(1), gallery.stride(0),
        gallery.stride(1), per_split, K=k, KP=triton.next_power_of_2(k), num_warps=warps,
        **triton_flags(queries.dtype, queries.is_cuda), **cfg, **LAUNCH_OPTIONS,
    )  # fmt: skip
    if splits == 1:
        return vals[0], idx[0]
    return merge(vals.permute(1, 0, 2).reshape(Q, splits * k), idx.permute(1, 0, 2).reshape(Q, splits * k), k)


# One k per KP = next_pow2(k) up to COSINE_TOPK_MAX_K_TRITON (256): k is a runtime integer, the kernel compiles per KP
K_REPRESENTATIVES = (1, 2, 3, 5, 9, 17, 33, 65, 129)


def launch_specs(arch: int) -> list:
    """Every kernel a GPU launch on ``sm_<arch>`` can compile, one per distinct tile (see
    :mod:`mdkernels.tools.gpu_compile`): fp16, bf16, fp32 and fp64 queries, each
    k class, each D class (:func:`mdkernels.ops._common.tiles.shape_representatives`), aligned and odd."""
    from mdkernels.ops._common.tiles import shape_representatives

    specs = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        acc = ptr(torch.float64 if dtype == torch.float64 else torch.float32)
        sig = {"QP": ptr(dtype), "GP": ptr(dtype), "RQ": acc, "RG": acc, "VALS": acc, "IDX": "*i64",
               "Qn": "i32", "Gn": "i32", "D": "i32", "stride_q": "i32", "stride_g": "i32", "per_split": "i32",
               "K": "i32"}  # fmt: skip
        for k in K_REPRESENTATIVES:
            for _, d, kind in shape_representatives():
                if kind == "one row":
                    continue  # the query count is any: its own specialisations are those of "aligned" and "odd"
                cfg = tile_config(dtype, d, k, arch)
                opts = {"num_warps": cfg.pop("num_warps"), "num_stages": 2}
                const = {"KP": triton.next_power_of_2(k), "stride_qc": 1, "stride_gc": 1, **triton_flags(dtype, True),
                         **cfg}  # fmt: skip
                ints = {"D": d, "stride_q": d, "stride_g": d}  # Qn, Gn, per_split, K: never specialised
                specs.append((f"cosine_topk {str(dtype).removeprefix('torch.')} k={k} D={d} {kind}",
                              _cosine_topk_kernel, sig, const, opts, ints))  # fmt: skip
    return specs
