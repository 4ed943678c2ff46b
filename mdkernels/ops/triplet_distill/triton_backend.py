"""Triton backend of triplet distillation's "all" mining: rows sorted by label, pairs x B work, no atomics."""

from __future__ import annotations

import torch

from mdkernels._cuda_ext import guard_device
from mdkernels._math import EPS
from mdkernels.ops._common.env import HAS_TRITON, LAUNCH_OPTIONS, gpu_tiles

if HAS_TRITON:
    import triton
    import triton.language as tl

    _EPS = tl.constexpr(EPS)

    @triton.jit(do_not_specialize=("B", "ignore_index"))  # any batch, one kernel
    def _triplet_all_kernel(
        DS, DT, Y, POS_START, POS_END, OUT_A, OUT_B, PARAMS, B, ignore_index,
        MODE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, ACC_DTYPE: tl.constexpr,
    ):  # fmt: skip
        """Program (anchor a, tile j), rows sorted by label so that a's positives are the contiguous range
        [POS_START[a], POS_END[a]) (a itself excluded below). MODE 0: tile j of a's positives; per p, max
        teacher gap and count of negatives. MODE 1: tile j of positives; per p, active-triplet count
        (dL/dD_ap * N) and hinge sum. MODE 2: tile j of negatives; per n, active-triplet count
        (-dL/dD_an * N), walking only a's positives. The work is pairs x B, not B^3."""
        a = tl.program_id(0)
        j = tl.program_id(1)
        d_max = tl.load(PARAMS)  # (d_max, m_min, m_max) in the accumulator dtype: fp64 stays fp64
        m_min = tl.load(PARAMS + 1)
        m_max = tl.load(PARAMS + 2)
        ya = tl.load(Y + a)
        a_valid = ya != ignore_index
        p_start = tl.load(POS_START + a)
        p_end = tl.load(POS_END + a)
        if MODE == 2:
            outer = j * BLOCK_N + tl.arange(0, BLOCK_N)
            o_mask = outer < B
            i_begin = p_start
            i_end = p_end
        else:
            outer = p_start + j * BLOCK_P + tl.arange(0, BLOCK_P)
            o_mask = outer < p_end
            i_begin = 0
            i_end = B
            if p_start + j * BLOCK_P >= p_end:  # a tile past a's positives: nothing to do
                i_end = 0
        yo = tl.load(Y + outer, mask=o_mask, other=ignore_index)
        if MODE == 2:  # outer index is a negative
            o_ok = o_mask & a_valid & (yo != ignore_index) & (yo != ya)
        else:  # outer index is a positive
            o_ok = o_mask & a_valid & (yo == ya) & (outer != a)
        ds_o = tl.load(DS + a * B + outer, mask=o_mask, other=0.0)
        dt_o = tl.load(DT + a * B + outer, mask=o_mask, other=0.0)
        acc1 = tl.zeros(outer.shape, ACC_DTYPE)
        acc2 = tl.zeros(outer.shape, ACC_DTYPE)
        if MODE == 0:
            acc1 = tl.full(outer.shape, -1.0, ACC_DTYPE)
        inner_block: tl.constexpr = BLOCK_P if MODE == 2 else BLOCK_N
        for i0 in range(i_begin, i_end, inner_block):
            inner = i0 + tl.arange(0, inner_block)
            i_mask = inner < i_end
            yi = tl.load(Y + inner, mask=i_mask, other=ignore_index)
            ds_i = tl.load(DS + a * B + inner, mask=i_mask, other=0.0)
            dt_i = tl.load(DT + a * B + inner, mask=i_mask, other=0.0)
            if MODE == 2:  # inner index is a positive
                i_ok = i_mask & (yi == ya) & (inner != a)
                ok = o_ok[None, :] & i_ok[:, None]  # (positives, negatives) of this (a, n-tile)
                gap = tl.maximum(dt_o[None, :] - dt_i[:, None], 0.0)
                hinge = ds_i[:, None] - ds_o[None, :]
            else:  # inner index is a negative
                i_ok = i_mask & (yi != ignore_index) & (yi != ya)
                ok = o_ok[:, None] & i_ok[None, :]
                gap = tl.maximum(dt_i[None, :] - dt_o[:, None], 0.0)
                hinge = ds_o[:, None] - ds_i[None, :]
            if MODE == 0:
                acc1 = tl.maximum(acc1, tl.max(tl.where(ok, gap, -1.0), 1))
                acc2 += tl.sum(ok.to(ACC_DTYPE), 1)
            else:
                hinge = hinge + (m_max - m_min) / tl.maximum(d_max, _EPS) * gap + m_min
                active = ok & (hinge > 0)
                red: tl.constexpr = 0 if MODE == 2 else 1
                acc1 += tl.sum(active.to(ACC_DTYPE), red)
                acc2 += tl.sum(tl.where(active, hinge, 0.0), red)
        tl.store(OUT_A + a * B + outer, acc1, mask=o_mask)
        if MODE != 2:
            tl.store(OUT_B + a * B + outer, acc2, mask=o_mask)


def sorted_positive_ranges(labels: torch.Tensor, ignore_index: int):
    """Rows sorted by label (ignored rows last): the permutation, the sorted labels, per sorted row the range
    [start, end) of rows with its label (empty for ignored rows), and the size of the largest class. That
    size sets the grid: it is the one host sync of mining (the ranges themselves come from ``searchsorted``)."""
    y = labels.long()
    key = torch.where(y == ignore_index, torch.full_like(y, torch.iinfo(torch.int64).max), y)
    key, perm = torch.sort(key, stable=True)
    start = torch.searchsorted(key, key, right=False)
    end = torch.searchsorted(key, key, right=True)
    valid = y[perm] != ignore_index
    start, end = torch.where(valid, start, 0), torch.where(valid, end, 0)
    largest = int((end - start).max()) if len(y) else 0
    return perm, y[perm].contiguous(), start.contiguous(), end.contiguous(), largest


@guard_device
def all_triplets(ds, dt, labels, m_min, m_max, ignore_index):
    B = ds.shape[0]
    acc = torch.float64 if ds.dtype == torch.float64 else torch.float32
    perm, y, start, end, largest = sorted_positive_ranges(labels, ignore_index)
    ds32 = ds.to(acc)[perm][:, perm].contiguous()  # sorted rows and columns: positives are contiguous
    dt32 = dt.to(acc)[perm][:, perm].contiguous()
    flags = dict(tile_config(), ACC_DTYPE=tl.float64 if acc == torch.float64 else tl.float32)
    bp, bn = flags["BLOCK_P"], flags["BLOCK_N"]
    params = torch.full((3,), float(m_min), dtype=acc, device=ds.device)  # a fill on the device, no host copy
    params[0], params[2] = 0.0, float(m_max)
    gmax = torch.zeros(B, B, dtype=acc, device=ds.device)  # only (anchor, positive) entries are written
    gcnt = torch.zeros_like(gmax)
    grid_p = (B, max(1, triton.cdiv(largest, bp)))  # tiles of the largest class's positives
    args = (ds32, dt32, y, start, end)
    _triplet_all_kernel[grid_p](*args, gmax, gcnt, params, B, ignore_index, MODE=0, **flags, **LAUNCH_OPTIONS)  # fmt: skip
    count = gcnt.sum()  # on the device; no valid triplet: 0 and a zero gradient
    params[0] = gmax.max()
    act_p, hinge = torch.zeros_like(gmax), torch.zeros_like(gmax)
    _triplet_all_kernel[grid_p](*args, act_p, hinge, params, B, ignore_index, MODE=1, **flags, **LAUNCH_OPTIONS)  # fmt: skip
    act_n = torch.empty_like(gmax)
    _triplet_all_kernel[(B, triton.cdiv(B, bn))](*args, act_n, act_n, params, B, ignore_index, MODE=2,
                                                 **flags, **LAUNCH_OPTIONS)  # fmt: skip
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(B, device=perm.device)
    n = count.clamp_min(1)
    grad = ((act_p - act_n) / n)[inv][:, inv].to(ds.dtype)  # back to the caller's row order
    return (hinge.sum() / n).to(ds.dtype), grad, count




def tile_config() -> dict:
    """Tiles of positives and negatives, and warps: the one place they are chosen (launcher and compile
    check). GPU: 8 warps compile without register spills on sm_80/sm_90; the interpreter: square tiles."""
    if not gpu_tiles():
        return dict(BLOCK_P=64, BLOCK_N=64, num_warps=4)
    return dict(BLOCK_P=32, BLOCK_N=128, num_warps=8)


def launch_specs(arch: int) -> list:
    """The kernel as a GPU launch compiles it (see :mod:`mdkernels.tools.gpu_compile`): distances in fp32 (fp64 for
    fp64 inputs), the same tiles on every arch, each mode."""
    cfg = tile_config()
    opts = {"num_warps": cfg.pop("num_warps")}
    specs = []
    for acc, tacc in (("*fp32", tl.float32), ("*fp64", tl.float64)):  # distances in fp32, or fp64 for fp64 inputs
        sig = {"DS": acc, "DT": acc, "Y": "*i64", "POS_START": "*i64", "POS_END": "*i64", "OUT_A": acc, "OUT_B": acc,
               "PARAMS": acc, "B": "i32", "ignore_index": "i32"}  # fmt: skip
        specs += [(f"triplet_all {acc[1:]} mode={m}", _triplet_all_kernel, sig, {"MODE": m, **cfg, "ACC_DTYPE": tacc},
                   opts, {}) for m in (0, 1, 2)]  # fmt: skip
    return specs
