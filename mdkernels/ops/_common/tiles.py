"""Triton tile helpers shared by the margin ops, and the one place their tile configurations live.

A margin kernel builds one (rows x classes) tile of raw cosines, either over all of D at once with the
rows or the centers resident (``FULL_D``: the tile of the other side is loaded once, normalised in fp32
and used for both of the kernel's dots) or over D in ``BLOCK_D`` steps (``cos_tile``, for D above what
fits). ``logits`` turns raw cosines into the non-target logits and the mask of entries that pass a
gradient. ``center_grad_epilogue`` finishes a class tile's ``dW``.

Tile sizes come from :func:`tile_config` (one entry per kernel and dtype class); the launchers and
:mod:`mdkernels.tools.gpu_compile` both read it. ``MDK_AUTOTUNE=1`` on a GPU times every entry of
:func:`candidate_configs` once per shape and keeps the fastest (:func:`autotuned`).
"""

from __future__ import annotations

import os

import torch

from mdkernels._spec import EPS
from mdkernels.ops._common.env import HAS_TRITON, interpreting

if HAS_TRITON:
    import triton
    import triton.language as tl

    _ZERO_ROW_RW = tl.constexpr(0.5 / EPS)  # 1/|w| at or above this: a zero row, linear in n() (no projection)

    @triton.jit
    def load_tile(P, rows, row_mask, dd, d_mask, stride):
        """Rows ``rows`` x columns ``dd`` of a row-major matrix with row stride ``stride``, zero outside."""
        return tl.load(P + rows[:, None].to(tl.int64) * stride + dd[None, :], mask=row_mask[:, None] & d_mask[None, :],
                       other=0.0)  # fmt: skip

    @triton.jit
    def normalised(t, r, OUT_DTYPE: tl.constexpr):
        """Rows of ``t`` times ``r`` (their inverse norms) in fp32 (fp64 stays fp64), then cast: every entry
        of a normalised row is in [-1, 1] whatever the norms, so a 16-bit operand cannot overflow."""
        return (t.to(r.dtype) * r[:, None]).to(OUT_DTYPE)

    @triton.jit
    def cos_tile(X, W, RX, RW, rows, cols, row_mask, col_mask, D, stride_x, stride_w, BLOCK_B: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr):  # fmt: skip
        """Raw cosines ``n(x_i) . n(w_j)`` of one (rows x cols) tile over D in BLOCK_D steps. The steps are
        normalised before the dot, as the resident tiles of the FULL_D kernels are, so that a kernel of
        either kind computes the same cosines (to the order of the fp32 sums)."""
        op_dtype = ACC_DTYPE if UPCAST else X.dtype.element_ty  # the interpreter's low-precision dot is unreliable
        rx = tl.load(RX + rows, mask=row_mask, other=0.0)
        rw = tl.load(RW + cols, mask=col_mask, other=0.0)
        acc = tl.zeros((BLOCK_B, BLOCK_C), dtype=ACC_DTYPE)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_mask = dd < D
            xn = normalised(load_tile(X, rows, row_mask, dd, d_mask, stride_x), rx, op_dtype)
            wn = normalised(load_tile(W, cols, col_mask, dd, d_mask, stride_w), rw, op_dtype)
            acc = tl.dot(xn, tl.trans(wn), acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        return acc

    @triton.jit
    def logits(raw, live, s, tau, bound, phi, t, HAS_FILTER: tl.constexpr, CURRICULAR: tl.constexpr):
        """``(z, keep, slope)`` from raw cosines: ``z = s*clamp(c, -bound, bound)``, CurricularFace's
        ``c (t + c)`` where ``c > phi`` (``slope = (dz/dc)/s = t + 2c`` there, else 1; only with CURRICULAR),
        insightface's filter (0 where ``c > tau``), ``-inf`` where not ``live`` (the target column,
        out-of-range entries); ``keep``: the entries that pass a gradient (live, inside the clamp before
        it, not filtered)."""
        keep = live & (raw >= -bound) & (raw <= bound)
        c = tl.minimum(tl.maximum(raw, -bound), bound)
        slope = tl.full(c.shape, 1.0, c.dtype)
        if CURRICULAR:
            hard = c > phi[:, None]
            slope = tl.where(hard, t + 2.0 * c, 1.0)
            c = tl.where(hard, c * (t + c), c)
        if HAS_FILTER:
            keep = keep & (c <= tau)
            c = tl.where(c > tau, 0.0, c)
        return tl.where(live, c * s, float("-inf")), keep, slope

    @triton.jit
    def subcenter_tile(raw, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, K: tl.constexpr, KP: tl.constexpr):
        """Raw cosines of ``BLOCK_C * KP`` weight rows (class-major, ``KP`` the padded K) to ``(BLOCK_B,
        BLOCK_C)`` class cosines, the max over each class's K sub-centers, and the argmax (first of ties)."""
        r3 = tl.reshape(raw, (BLOCK_B, BLOCK_C, KP))
        ks = tl.arange(0, KP)[None, None, :]
        r3 = tl.where(ks < K, r3, float("-inf"))
        best = tl.max(r3, 2)
        kidx = tl.min(tl.where(r3 == best[:, :, None], ks, KP), 2)
        return best, kidx

    @triton.jit
    def spread_rows(v, kidx, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, KP: tl.constexpr):
        """``(BLOCK_B, BLOCK_C)`` class entries onto their argmax sub-center: ``(BLOCK_B, BLOCK_C * KP)``."""
        ks = tl.arange(0, KP)[None, None, :]
        return tl.reshape(tl.where(ks == kidx[:, :, None], v[:, :, None], 0.0), (BLOCK_B, BLOCK_C * KP))

    @triton.jit
    def center_grad_epilogue(acc, dot, gscale, wt, rw, cols, col_mask, dd, d_mask, DW, stride_dw):
        """Writes ``dL/dw_j = rw_j * gscale * acc_j - w_j * rw_j^2 dot_j`` for a class tile, with ``acc`` the
        (scaled) ``G^T n(x)`` and ``dot_j = sum_i G_ij c_ij = <n(w_j), dW^_j>``: the normalisation backward
        without a pass over D. Rows of norm below EPS have no projection (``n(w) = w / EPS``)."""
        proj = tl.where(rw >= _ZERO_ROW_RW, 0.0, dot * rw * rw)
        dw = acc * (gscale * rw)[:, None] - wt.to(acc.dtype) * proj[:, None]
        tl.store(DW + cols[:, None].to(tl.int64) * stride_dw + dd[None, :], dw.to(DW.dtype.element_ty),
                 mask=col_mask[:, None] & d_mask[None, :])  # fmt: skip


def triton_flags(dtype: torch.dtype, on_cuda: bool) -> dict:
    """Accumulator dtype, interpreter upcast and dot precision of a kernel on ``dtype`` inputs."""
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    allow_tf32 = on_cuda and torch.backends.cuda.matmul.allow_tf32
    precision = "tf32" if (dtype in (torch.float16, torch.bfloat16) or allow_tf32) else "ieee"
    upcast = interpreting() and dtype in (torch.float16, torch.bfloat16)
    return dict(ACC_DTYPE=acc, UPCAST=upcast, PRECISION=precision)


# (kernel, dtype class) -> the default tile. ``full_d``: the largest padded D kept resident (an accumulator of
# BLOCK x D fp32 and a resident tile must fit the registers); above it each program owns ``split_do``
# columns of D and steps over D in BLOCK_D. For the forward, BLOCK_B rows are resident against BLOCK_C
# classes; for the center gradient BLOCK_C classes against BLOCK_B rows. Untuned GPU defaults, chosen to
# compile without register spills on sm_80 and sm_90 at D = 512 and 1024 (test_gpu_compile asserts it).
_TILES = {
    ("forward", "half"): dict(BLOCK_B=16, BLOCK_C=64, num_warps=8, num_stages=2, full_d=512, split_do=256),
    ("forward", "fp32"): dict(BLOCK_B=16, BLOCK_C=32, num_warps=4, num_stages=2, full_d=256, split_do=128),
    ("center_grad", "half"): dict(BLOCK_B=32, BLOCK_C=32, num_warps=8, num_stages=2, full_d=256, split_do=256),
    ("center_grad", "fp32"): dict(BLOCK_B=32, BLOCK_C=32, num_warps=8, num_stages=2, full_d=256, split_do=128),
    ("kd_forward", "half"): dict(BLOCK_B=16, BLOCK_C=32, num_warps=8, num_stages=2, full_d=512, split_do=256),
    ("kd_forward", "fp32"): dict(BLOCK_B=16, BLOCK_C=32, num_warps=8, num_stages=2, full_d=256, split_do=128),
    ("kd_center_grad", "half"): dict(BLOCK_B=32, BLOCK_C=32, num_warps=8, num_stages=2, full_d=256, split_do=256),
    ("kd_center_grad", "fp32"): dict(BLOCK_B=32, BLOCK_C=16, num_warps=8, num_stages=2, full_d=256, split_do=128),
}
# The interpreter: few, large tiles (each program iteration costs ~ms); D up to 512 resident.
_INTERPRET = dict(BLOCK_C=128, num_warps=4, num_stages=1, full_d=512, split_do=256)


def tile_config(kernel: str, dtype: torch.dtype, B: int, D: int, subcenters: int = 1) -> dict:
    """The tile of ``kernel`` ("forward", "center_grad", "kd_forward", "kd_center_grad") for ``dtype`` and
    D: BLOCK_B, BLOCK_C, BLOCK_D (the step of a D loop), BLOCK_DO (the columns of D one program owns),
    FULL_D (D resident in one BLOCK_DO), num_warps, num_stages. Above the resident size, D is split over
    the grid in BLOCK_DO columns; each of those programs builds the cosines over all of D in steps. With
    ``subcenters`` K, a class tile spans BLOCK_C * next_pow2(K) weight rows: BLOCK_C shrinks to match."""
    if interpreting():
        cfg = dict(_INTERPRET, BLOCK_B=max(16, min(64, triton.next_power_of_2(max(B, 1)))))
    else:
        cfg = dict(_TILES[(kernel, "half" if dtype in (torch.float16, torch.bfloat16) else "fp32")])
    cfg["BLOCK_C"] = max(16 if subcenters == 1 else 1, cfg["BLOCK_C"] // triton.next_power_of_2(subcenters))
    if subcenters > 1 and not interpreting():  # the (B, C, K) max tile: 4 warps spill on sm_80
        cfg["num_warps"] = 8
    full_d, split_do = cfg.pop("full_d"), cfg.pop("split_do")
    d_pad = triton.next_power_of_2(max(D, 16))
    if d_pad <= full_d:
        return dict(cfg, BLOCK_D=d_pad, BLOCK_DO=d_pad, FULL_D=True)
    return dict(cfg, BLOCK_D=64, BLOCK_DO=split_do, FULL_D=False)


def candidate_configs(kernel: str, dtype: torch.dtype, B: int, D: int, **options) -> list[dict]:
    """The default tile first, then the variants ``MDK_AUTOTUNE=1`` times on a GPU."""
    base = tile_config(kernel, dtype, B, D, **options)
    out = [base]
    for bb, bc, warps in ((base["BLOCK_B"] * 2, base["BLOCK_C"], 8), (base["BLOCK_B"], base["BLOCK_C"] * 2, 8),
                          (base["BLOCK_B"], base["BLOCK_C"], 4), (base["BLOCK_B"] // 2 or 16, base["BLOCK_C"], 4)):  # fmt: skip
        cand = dict(base, BLOCK_B=max(16, bb), BLOCK_C=max(min(16, base["BLOCK_C"]), bc), num_warps=warps)
        if cand not in out:
            out.append(cand)
    return out


_TUNED: dict[tuple, dict] = {}


def autotuned(kernel: str, x: torch.Tensor, B: int, C: int, D: int, launch, **options) -> dict:
    """The config ``launch(cfg)`` runs with: :func:`tile_config`, or with ``MDK_AUTOTUNE=1`` on a GPU the
    fastest of :func:`candidate_configs` for this (kernel, dtype, B, C, D), timed once and remembered."""
    default = tile_config(kernel, x.dtype, B, D, **options)
    if not (x.is_cuda and os.environ.get("MDK_AUTOTUNE") == "1"):
        return default
    key = (kernel, x.dtype, B, C, D, x.device.index, tuple(sorted(options.items())))
    if key not in _TUNED:
        import triton.testing

        timed = []
        for cfg in candidate_configs(kernel, x.dtype, B, D, **options):
            try:
                timed.append((triton.testing.do_bench(lambda cfg=cfg: launch(cfg)), cfg))
            except Exception:  # a candidate that does not fit this GPU (shared memory, registers) is skipped
                continue
        _TUNED[key] = min(timed, key=lambda t: t[0])[1] if timed else default
    return _TUNED[key]
