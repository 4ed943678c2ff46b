"""Triton tile helpers shared by the margin ops, and the one place their tile configurations live.

A margin kernel builds one (rows x classes) tile of raw cosines, either over all of D at once with the
rows or the centers resident (``FULL_D``: the tile of the other side is loaded once, normalised in fp32
and used for both of the kernel's dots) or over D in ``BLOCK_D`` steps (``cos_tile``, for D above what
fits). ``logits`` turns raw cosines into the non-target logits and the mask of entries that pass a
gradient. ``center_grad_epilogue`` finishes a class tile's ``dW``.

Tile sizes come from :func:`tile_config` (one entry per kernel and dtype class); the launchers and
:mod:`mdkernels.tools.gpu_compile` both read it: a fixed rule of the dtype, shape and arch, never a timing.
``MDK_AUTOTUNE=1`` on a GPU times every entry of :func:`mdkernels.ops._common.autotune.candidate_configs` once per
shape, records the fastest in a file and reuses it from then on, in every later run (its :func:`autotuned`).
"""

from __future__ import annotations

import torch

from mdkernels._math import EPS
from mdkernels.ops._common.env import HAS_TRITON, gpu_tiles, interpreting

if HAS_TRITON:
    import triton
    import triton.language as tl

    _ZERO_ROW_RW = tl.constexpr(0.5 / EPS)  # 1/|w| at or above this: a zero row, linear in n() (no projection)

    @triton.jit
    def load_tile(P, rows, row_mask, dd, d_mask, stride_r, stride_c):
        """Rows ``rows`` x columns ``dd`` of a matrix with strides ``(stride_r, stride_c)`` (any layout: the
        centers of pytorch-metric-learning's ``(D, C)`` parameter arrive as a ``(C, D)`` view with strides
        ``(1, C)``, and a launch specialises ``stride_c == 1`` away), zero outside the masks."""
        return tl.load(P + rows[:, None].to(tl.int64) * stride_r + dd[None, :].to(tl.int64) * stride_c,
                       mask=row_mask[:, None] & d_mask[None, :], other=0.0)  # fmt: skip

    @triton.jit
    def round_bf16(x):
        """fp32 ``x`` rounded to the nearest bf16 (ties to even), returned as fp32: the value a GPU's bf16
        operand holds. The interpreter's own fp32 -> bf16 cast is off by an ulp on some values."""
        b = x.to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        return b.to(tl.float32, bitcast=True)

    @triton.jit
    def as_operand(t, OP_DTYPE: tl.constexpr, ROUND: tl.constexpr):
        """``t`` as a ``tl.dot`` operand of ``OP_DTYPE``. ``ROUND`` (the interpreter, whose 16-bit dots are
        unreliable): the 16-bit value, kept in fp32 for an fp32 dot, so that CPU tests see the rounding of
        every 16-bit operand a GPU sees."""
        if ROUND and OP_DTYPE == tl.bfloat16:
            out = round_bf16(t.to(tl.float32))
        elif ROUND and OP_DTYPE == tl.float16:
            out = t.to(tl.float16).to(tl.float32)
        else:
            out = t.to(OP_DTYPE)
        return out

    @triton.jit
    def normalised(t, r, OP_DTYPE: tl.constexpr, ROUND: tl.constexpr):
        """Rows of ``t`` times ``r`` (their inverse norms) in fp32 (fp64 stays fp64), then the dot operand
        (:func:`as_operand`): every entry of a normalised row is in [-1, 1] whatever the norms, so a 16-bit
        operand cannot overflow. fp32 tiles under autocast are cast here, in registers: no 16-bit copy of
        the centers is ever made."""
        return as_operand(t.to(r.dtype) * r[:, None], OP_DTYPE, ROUND)

    @triton.jit
    def cos_tile(A, Bm, RA, RB, ra_idx, rb_idx, a_mask, b_mask, D, sa, sac, sb, sbc, BLOCK_A: tl.constexpr,
                 BLOCK_BB: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr, OP_DTYPE: tl.constexpr,
                 ROUND: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
        """Raw cosines ``n(a_i) . n(b_j)`` of one ``(BLOCK_A, BLOCK_BB)`` tile over D in BLOCK_D steps (rows of
        ``A`` against rows of ``Bm``: embeddings against centers, or class-major, centers against
        embeddings). The steps are normalised before the dot, as the resident tiles of the FULL_D kernels
        are, so that a kernel of either kind computes the same cosines (to the order of the fp32 sums)."""
        ra = tl.load(RA + ra_idx, mask=a_mask, other=0.0)
        rb = tl.load(RB + rb_idx, mask=b_mask, other=0.0)
        acc = tl.zeros((BLOCK_A, BLOCK_BB), dtype=ACC_DTYPE)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + tl.arange(0, BLOCK_D)
            d_mask = dd < D
            an = normalised(load_tile(A, ra_idx, a_mask, dd, d_mask, sa, sac), ra, OP_DTYPE, ROUND)
            bn = normalised(load_tile(Bm, rb_idx, b_mask, dd, d_mask, sb, sbc), rb, OP_DTYPE, ROUND)
            acc = tl.dot(an, tl.trans(bn), acc, input_precision=PRECISION, out_dtype=ACC_DTYPE)
        return acc

    @triton.jit
    def logits(raw, live, s, tau, bound, phi, t, HAS_FILTER: tl.constexpr, CURRICULAR: tl.constexpr):
        """``(z, keep, slope)`` from raw cosines: ``z = s*clamp(c, -bound, bound)``, CurricularFace's
        ``c (t + c)`` where ``c > phi`` (``phi``: the rows' thresholds, broadcastable to ``raw``; ``slope =
        (dz/dc)/s = t + 2c`` there, else 1; only with CURRICULAR), insightface's filter (0 where ``c > tau``),
        ``-inf`` where not ``live`` (the target column, out-of-range entries); ``keep``: the entries that pass
        a gradient (live, inside the clamp before it, not filtered)."""
        keep = live & (raw >= -bound) & (raw <= bound)
        c = tl.minimum(tl.maximum(raw, -bound), bound)
        slope = tl.full(c.shape, 1.0, c.dtype)
        if CURRICULAR:
            hard = c > phi
            slope = tl.where(hard, t + 2.0 * c, 1.0)
            c = tl.where(hard, c * (t + c), c)
        if HAS_FILTER:
            keep = keep & (c <= tau)
            c = tl.where(c > tau, 0.0, c)
        return tl.where(live, c * s, float("-inf")), keep, slope

    @triton.jit
    def subcenter_tile(raw, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, K, KP: tl.constexpr):
        """Raw cosines of ``BLOCK_C * KP`` weight rows (class-major, ``KP`` the padded K) to ``(BLOCK_B,
        BLOCK_C)`` class cosines, the max over each class's K sub-centers, and the argmax (first of ties)."""
        r3 = tl.reshape(raw, (BLOCK_B, BLOCK_C, KP))
        ks = tl.arange(0, KP)[None, None, :]
        r3 = tl.where(ks < K, r3, float("-inf"))
        best = tl.max(r3, 2)
        kidx = tl.min(tl.where(r3 == best[:, :, None], ks, KP), 2)
        return best, kidx

    @triton.jit
    def subcenter_tile_cm(raw, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, K, KP: tl.constexpr):
        """:func:`subcenter_tile` for a class-major tile: ``(BLOCK_C * KP, BLOCK_B)`` to ``(BLOCK_C, BLOCK_B)``."""
        r3 = tl.reshape(raw, (BLOCK_C, KP, BLOCK_B))
        ks = tl.arange(0, KP)[None, :, None]
        r3 = tl.where(ks < K, r3, float("-inf"))
        best = tl.max(r3, 1)
        kidx = tl.min(tl.where(r3 == best[:, None, :], ks, KP), 1)
        return best, kidx

    @triton.jit
    def spread_rows(v, kidx, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, KP: tl.constexpr):
        """``(BLOCK_B, BLOCK_C)`` class entries onto their argmax sub-center: ``(BLOCK_B, BLOCK_C * KP)``."""
        ks = tl.arange(0, KP)[None, None, :]
        return tl.reshape(tl.where(ks == kidx[:, :, None], v[:, :, None], 0.0), (BLOCK_B, BLOCK_C * KP))

    @triton.jit
    def spread_rows_cm(v, kidx, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, KP: tl.constexpr):
        """:func:`spread_rows` class-major: ``(BLOCK_C, BLOCK_B)`` to ``(BLOCK_C * KP, BLOCK_B)``."""
        ks = tl.arange(0, KP)[None, :, None]
        return tl.reshape(tl.where(ks == kidx[:, None, :], v[:, None, :], 0.0), (BLOCK_C * KP, BLOCK_B))

    @triton.jit
    def _round_as(v, P):
        """``v`` rounded to the nearest value of the dtype ``P`` points to (ties to even), back in ``v``'s dtype:
        bf16 through :func:`round_bf16` (the interpreter's own cast truncates), so that the value stored is the
        one torch's cast would store."""
        if P.dtype.element_ty == tl.bfloat16:
            out = round_bf16(v.to(tl.float32)).to(v.dtype)
        else:
            out = v.to(P.dtype.element_ty).to(v.dtype)
        return out

    @triton.jit
    def center_grad_epilogue(acc, dot, gscale, wt, rw, cols, col_mask, dd, d_mask, DW, stride_dw, stride_dwc):
        """Writes ``dL/dw_j = rw_j * gscale * acc_j - w_j * rw_j^2 dot_j`` for a class tile, with ``acc`` the
        (scaled) ``G^T n(x)`` and ``dot_j = sum_i G_ij c_ij = <n(w_j), dW^_j>``: the normalisation backward
        without a pass over D. Rows of norm below EPS have no projection (``n(w) = w / EPS``)."""
        proj = tl.where(rw >= _ZERO_ROW_RW, 0.0, dot * rw * rw)
        dw = _round_as(acc * (gscale * rw)[:, None] - wt.to(acc.dtype) * proj[:, None], DW)
        tl.store(DW + cols[:, None].to(tl.int64) * stride_dw + dd[None, :].to(tl.int64) * stride_dwc,
                 dw.to(DW.dtype.element_ty), mask=col_mask[:, None] & d_mask[None, :])  # fmt: skip

    @triton.jit
    def _update_gradient(acc, dot, gscale, wt, rw, mask, W, INV, FOUND, maximize, SCALED: tl.constexpr):
        """The tile's gradient as :func:`center_grad_epilogue` forms it, rounded to the centers' dtype, unscaled
        (``SCALED``: a row with a non-finite entry is left out of ``keep`` and sets ``FOUND``), negated for
        ``maximize``; with the tile's centers ``p`` in the accumulator's dtype."""
        proj = tl.where(rw >= _ZERO_ROW_RW, 0.0, dot * rw * rw)
        p = wt.to(acc.dtype)
        g = _round_as(acc * (gscale * rw)[:, None] - p * proj[:, None], W)
        keep = mask
        if SCALED:
            g = _round_as(g * tl.load(INV), W)
            bad = tl.max(tl.where(mask & ((g != g) | (tl.abs(g) == float("inf"))), 1, 0), 1) > 0
            keep = mask & ~bad[:, None]
            tl.atomic_max(FOUND, tl.max(bad.to(tl.int32), 0))
        if maximize != 0:
            g = -g
        return g, p, keep

    @triton.jit
    def _update_states(g, p, offs, mask, keep, W, S1, S2, wd, mom, damp, nesterov, first, beta1, beta2,
                       UPDATE: tl.constexpr):  # fmt: skip
        """The optimizer's state from the gradient ``g`` and the centers ``p``, stored where ``keep``: SGD's momentum
        buffer (``UPDATE == 1``; returns the step's direction), AdamW's two moments (returns them). Each of
        torch.optim's operations rounded to the centers' dtype (a no-op in fp32), as torch rounds it."""
        m = g
        v = g
        if UPDATE == 1:
            if wd != 0:
                g = _round_as(g + wd * p, W)
            if mom != 0:
                if first != 0:
                    buf = g
                else:
                    buf = _round_as(tl.load(S1 + offs, mask=mask, other=0.0).to(g.dtype) * mom, W)
                    buf = _round_as(buf + (1 - damp) * g, W)
                tl.store(S1 + offs, buf.to(S1.dtype.element_ty), mask=keep)
                if nesterov != 0:
                    g = _round_as(g + mom * buf, W)
                else:
                    g = buf
        else:
            m = tl.load(S1 + offs, mask=mask, other=0.0).to(g.dtype)
            v = tl.load(S2 + offs, mask=mask, other=0.0).to(g.dtype)
            m = _round_as(m + (1 - beta1) * (g - m), W)
            v = _round_as(_round_as(v * beta2, W) + (1 - beta2) * g * g, W)
            tl.store(S1 + offs, m.to(S1.dtype.element_ty), mask=keep)
            tl.store(S2 + offs, v.to(S2.dtype.element_ty), mask=keep)
        return g, m, v

    @triton.jit
    def _update_weights(p, g, m, v, W, lr, wd, eps, step_size, bc2_sqrt, UPDATE: tl.constexpr):
        """The centers after the step: SGD ``p - lr g`` (``g`` the direction), AdamW's decoupled weight decay and
        ``p - step_size m / (sqrt(v) / bc2_sqrt + eps)``, each operation rounded as torch rounds it."""
        if UPDATE == 1:
            p = _round_as(p - lr * g, W)
        else:
            if wd != 0:
                p = _round_as(p * (1 - lr * wd), W)
            denom = _round_as(_round_as(_round_as(tl.sqrt(v), W) / bc2_sqrt, W) + eps, W)
            p = _round_as(p - step_size * (m / denom), W)
        return p

    @triton.jit
    def center_update_epilogue(acc, dot, gscale, wt, rw, cols, col_mask, dd, d_mask, W, S1, S2, stride_w, stride_wc,
                               INV, FOUND, lr, wd, mom, damp, nesterov, first, maximize, beta1, beta2, eps, step_size,
                               bc2_sqrt, UPDATE: tl.constexpr, SCALED: tl.constexpr):  # fmt: skip
        """The fused center update (mdkernels/ops/_common/center_update.py, torch.optim's math) of a class tile whose
        rows this program alone reads: SGD (``UPDATE == 1``: momentum buffer ``S1``) or AdamW (``UPDATE == 2``:
        ``S1``, ``S2`` the two moments) applied to the centers ``W`` and the state, which share ``W``'s strides."""
        mask = col_mask[:, None] & d_mask[None, :]
        offs = cols[:, None].to(tl.int64) * stride_w + dd[None, :].to(tl.int64) * stride_wc
        g, p, keep = _update_gradient(acc, dot, gscale, wt, rw, mask, W, INV, FOUND, maximize, SCALED)
        g, m, v = _update_states(g, p, offs, mask, keep, W, S1, S2, wd, mom, damp, nesterov, first, beta1, beta2,
                                 UPDATE)  # fmt: skip
        p = _update_weights(p, g, m, v, W, lr, wd, eps, step_size, bc2_sqrt, UPDATE)
        tl.store(W + offs, p.to(W.dtype.element_ty), mask=keep)

    @triton.jit
    def center_update_states(acc, dot, gscale, wt, rw, cols, col_mask, dd, d_mask, W, S1, S2, stride_w, stride_wc,
                             wd, mom, damp, first, maximize, beta1, beta2, UPDATE: tl.constexpr):  # fmt: skip
        """The first phase of a class tile's update where its rows' columns are spread over a loop (the program still
        reads the rows for its cosines): the state of these columns only (SGD's buffer without nesterov, AdamW's
        moments), which no cosine reads. :func:`center_update_weights` then moves the centers."""
        mask = col_mask[:, None] & d_mask[None, :]
        offs = cols[:, None].to(tl.int64) * stride_w + dd[None, :].to(tl.int64) * stride_wc
        g, p, keep = _update_gradient(acc, dot, gscale, wt, rw, mask, W, W, W, maximize, False)
        _update_states(g, p, offs, mask, keep, W, S1, S2, wd, mom, damp, 0, first, beta1, beta2, UPDATE)

    @triton.jit
    def center_update_weights(cols, col_mask, dd, d_mask, W, S1, S2, stride_w, stride_wc, lr, wd, eps, step_size,
                              bc2_sqrt, UPDATE: tl.constexpr):  # fmt: skip
        """The second phase: the centers' columns from their old values and the new state alone (SGD:
        ``p - lr b``; AdamW: the decay and the moments' step), once every cosine of the tile is done."""
        mask = col_mask[:, None] & d_mask[None, :]
        offs = cols[:, None].to(tl.int64) * stride_w + dd[None, :].to(tl.int64) * stride_wc
        p = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(S1 + offs, mask=mask, other=0.0).to(tl.float32)
        v = m
        if UPDATE == 2:
            v = tl.load(S2 + offs, mask=mask, other=0.0).to(tl.float32)
        p = _update_weights(p, m, m, v, W, lr, wd, eps, step_size, bc2_sqrt, UPDATE)
        tl.store(W + offs, p.to(W.dtype.element_ty), mask=mask)


def triton_flags(dtype: torch.dtype, on_cuda: bool, op_dtype: torch.dtype | None = None) -> dict:
    """The precision constexprs of a kernel on ``dtype`` inputs whose dots take ``op_dtype`` operands (the
    input dtype, or the autocast dtype for fp32 inputs under ``torch.autocast``):

    * ``ACC_DTYPE``: fp32 accumulation (fp64 for fp64 inputs);
    * ``OP_DTYPE``: the dots' operand dtype; tiles are loaded in the input dtype, normalised in fp32 and
      cast in registers;
    * ``ROUND``: under the interpreter, 16-bit operands are rounded to their 16-bit value and the dot runs in
      fp32 (the interpreter's 16-bit dots are unreliable), so CPU tests see a GPU's operand rounding;
    * ``PRECISION``: fp32 operands on a GPU use ``tf32x3`` (three TF32 tensor-core products, near-fp32: a
      cosine to about 1e-6), whatever ``torch.backends.cuda.matmul.allow_tf32`` says. Plain TF32 would
      leave about 1e-3 on a cosine, 0.06 on a logit at s = 64, silently; bf16/fp16 (or autocast) is the fast
      path and says so in its dtype. fp64: IEEE."""
    op = op_dtype if op_dtype is not None else dtype
    half = op in (torch.float16, torch.bfloat16)
    round_ = interpreting() and half
    if op == torch.float64 or round_ or not on_cuda:
        precision = "ieee"
    else:
        precision = "tf32" if half else "tf32x3"  # the 16-bit dots ignore it
    return dict(ACC_DTYPE=tl.float64 if dtype == torch.float64 else tl.float32, OP_DTYPE=_TL[op], ROUND=round_,
                PRECISION=precision)  # fmt: skip


_TL = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# (kernel, operand class, arch class) -> the default tile. The arch class: "hopper" (sm_90, sm_100: wgmma /
# Blackwell MMA, 227 KiB of shared memory) or "ampere" (sm_80-89 and the consumer Blackwell sm_120:
# mma.sync, and an 8.x kernel must fit the 99 KiB of sm_86/89). ``full_d``: the largest padded D kept resident
# (an accumulator of BLOCK x D fp32 and a resident tile must fit the registers); above it each program owns
# ``split_do`` columns of D and recomputes the cosines over all of D (see :func:`gemm_units`). The forward
# is row-major (BLOCK_B rows against BLOCK_C classes: M = BLOCK_B); the center gradient class-major
# (BLOCK_C classes against BLOCK_B rows: M = BLOCK_C), so that both of its products are M = 64 wgmma on
# Hopper whatever B. Untuned without a GPU: chosen to compile without register spills, within each
# family's shared memory, with wgmma in the sm_90 16-bit kernels (test_gpu_compile asserts all three).
_TILES = {
    ("forward", "half", "ampere"): dict(BLOCK_B=16, BLOCK_C=64, num_warps=8, num_stages=2, full_d=512, split_do=256,
                                        odd=dict(full_d=128, split_do=128)),
    ("forward", "fp32", "ampere"): dict(BLOCK_B=16, BLOCK_C=32, num_warps=8, num_stages=2, full_d=128, split_do=256,
                                        odd=dict(full_d=64, split_do=128)),
    # 64 classes spilled 64-160 B at D = 128 and 256 with the filter and CurricularFace on (Triton 3.9): 32 (wgmma N = 32)
    ("forward", "half", "hopper"): dict(BLOCK_B=64, BLOCK_C=32, num_warps=8, num_stages=2, full_d=256, split_do=256,
                                        odd=dict(full_d=64, split_do=128)),
    # fp32 on Hopper: Triton 3.6 spilled the 32-class forward tile and the 64-class wgmma center-gradient tile
    # (tf32x3's split operands), Triton 3.8 a 16 x 16 one with 128 columns per program; the 16-class forward
    # keeps wgmma, the center gradient runs the mma.sync tile of sm_80
    ("forward", "fp32", "hopper"): dict(BLOCK_B=64, BLOCK_C=16, num_warps=8, num_stages=2, full_d=64, split_do=128,
                                        odd=dict(BLOCK_B=16, BLOCK_C=32, full_d=64, split_do=128)),
    # the center gradient holds a (classes x BLOCK_DO) fp32 accumulator and, resident, the class tile over D: at most
    # 128 columns resident (256 spilled 0.8-1 KB on sm_90 with the filter and CurricularFace on, Triton 3.9)
    ("center_grad", "half", "ampere"): dict(BLOCK_B=32, BLOCK_C=32, num_warps=8, num_stages=2, full_d=128,
                                            split_do=256, odd=dict(full_d=64, split_do=128)),
    ("center_grad", "fp32", "ampere"): dict(BLOCK_B=32, BLOCK_C=16, num_warps=8, num_stages=2, full_d=64,
                                            split_do=128, odd=dict(full_d=64, split_do=64)),
    ("center_grad", "half", "hopper"): dict(BLOCK_B=32, BLOCK_C=64, num_warps=8, num_stages=2, full_d=128,
                                            split_do=256, odd=dict(full_d=64, split_do=128)),
    ("center_grad", "fp32", "hopper"): dict(BLOCK_B=32, BLOCK_C=16, num_warps=8, num_stages=2, full_d=64,
                                            split_do=128, odd=dict(full_d=64, split_do=64)),
    # 16-bit margin KD on sm_80/sm_120: D = 512 resident spilled (Triton 3.8), so D above 256 is split
    ("kd_forward", "half", "ampere"): dict(BLOCK_B=16, BLOCK_C=32, num_warps=8, num_stages=2, full_d=256, split_do=256,
                                           odd=dict(full_d=128, split_do=128)),
    ("kd_forward", "fp32", "ampere"): dict(BLOCK_B=16, BLOCK_C=32, num_warps=8, num_stages=2, full_d=64, split_do=128,
                                           odd=dict(full_d=64, split_do=64, block_d=32)),
    ("kd_forward", "half", "hopper"): dict(BLOCK_B=64, BLOCK_C=32, num_warps=8, num_stages=2, full_d=64, split_do=128,
                                           odd=dict(full_d=64, split_do=64)),
    # fp32 margin KD on Hopper: two cosine tiles, three accumulators and tf32x3's split operands spill at any
    # 64-row wgmma tile; the mma.sync tiles of sm_80 compile clean
    ("kd_forward", "fp32", "hopper"): dict(BLOCK_B=16, BLOCK_C=32, num_warps=8, num_stages=2, full_d=64, split_do=128,
                                           odd=dict(full_d=64, split_do=64)),
    ("kd_center_grad", "half", "ampere"): dict(BLOCK_B=32, BLOCK_C=32, num_warps=8, num_stages=2, full_d=64,
                                               split_do=256, odd=dict(full_d=64, split_do=128)),
    ("kd_center_grad", "fp32", "ampere"): dict(BLOCK_B=32, BLOCK_C=16, num_warps=8, num_stages=2, full_d=64,
                                               split_do=128, odd=dict(full_d=64, split_do=64)),
    ("kd_center_grad", "half", "hopper"): dict(BLOCK_B=32, BLOCK_C=64, num_warps=8, num_stages=2, full_d=64,
                                               split_do=256, odd=dict(full_d=64, split_do=128)),
    ("kd_center_grad", "fp32", "hopper"): dict(BLOCK_B=32, BLOCK_C=16, num_warps=8, num_stages=2, full_d=64,
                                               split_do=128, odd=dict(full_d=64, split_do=64)),
    # fp64 (any arch: IEEE fp64 MMA, no wgmma): small tiles, twice the registers per element
    # (sm_86, 89 and 120 have no fp64 tensor cores: FMA dots, which spilled at 128 resident columns on sm_120)
    ("forward", "fp64", "any"): dict(BLOCK_B=16, BLOCK_C=16, num_warps=4, num_stages=1, full_d=64, split_do=64,
                                     block_d=32),
    ("center_grad", "fp64", "any"): dict(BLOCK_B=16, BLOCK_C=16, num_warps=4, num_stages=1, full_d=64, split_do=64,
                                         block_d=32),
    ("kd_forward", "fp64", "any"): dict(BLOCK_B=16, BLOCK_C=16, num_warps=4, num_stages=1, full_d=64, split_do=64,
                                       block_d=32),
    ("kd_center_grad", "fp64", "any"): dict(BLOCK_B=16, BLOCK_C=16, num_warps=4, num_stages=1, full_d=64, split_do=64,
                                           block_d=32),
}  # fmt: skip
# The interpreter: few, large tiles (each program iteration costs ~ms); D up to 512 resident.
_INTERPRET = dict(BLOCK_C=128, num_warps=4, num_stages=1, full_d=512, split_do=256)
HOPPER_MIN_ROWS = 64  # below this many rows the forward keeps the small mma.sync row tile on Hopper too


def arch_class(arch: int | None) -> str:
    """"hopper" for sm_90 to sm_119 (wgmma, or Blackwell's MMA, and 227 KiB of shared memory), else "ampere"."""
    return "hopper" if arch is not None and 90 <= arch < 120 else "ampere"


def tile_config(kernel: str, dtype: torch.dtype, B: int, D: int, subcenters: int = 1, arch: int | None = 80,
                op_dtype: torch.dtype | None = None, aligned: bool | None = None, update: bool = False) -> dict:  # fmt: skip
    """The tile of ``kernel`` ("forward", "center_grad", "kd_forward", "kd_center_grad") for ``dtype`` inputs
    with ``op_dtype`` dot operands (default: the input dtype), D and the GPU's compute capability ``arch``
    (``10 * major + minor``): BLOCK_B, BLOCK_C, BLOCK_D (the step of a D loop), BLOCK_DO (the columns of D one
    program owns), FULL_D (D resident in one BLOCK_DO), num_warps, num_stages. Above the resident size, D is
    split over the grid in BLOCK_DO columns; each of those programs builds the cosines over all of D in steps.
    With ``subcenters`` K, a class tile spans BLOCK_C * next_pow2(K) weight rows: BLOCK_C shrinks to match.
    ``aligned`` (default: D a multiple of 16, the hint a launch gives D and the row strides): an odd D loads element
    by element, one address per element in registers, so it takes the entry's ``odd`` tile (less of D resident,
    narrower splits, or a smaller tile)."""
    op = op_dtype if op_dtype is not None else dtype
    if not gpu_tiles():
        cfg = dict(_INTERPRET, BLOCK_B=max(16, min(64, triton.next_power_of_2(max(B, 1)))))
    else:
        klass = arch_class(arch)
        if klass == "hopper" and kernel in ("forward", "kd_forward") and B < HOPPER_MIN_ROWS:
            klass = "ampere"  # a 64-row tile would be mostly padding: mma.sync on a 16-row tile
        dclass = "half" if op in (torch.float16, torch.bfloat16) else "fp64" if op == torch.float64 else "fp32"
        cfg = dict(_TILES[(kernel, dclass, "any" if dclass == "fp64" else klass)])
        if op != dtype:  # autocast: fp32 tiles in flight for 16-bit operands, twice the registers of a 16-bit load
            cfg["full_d"], cfg["split_do"] = min(cfg["full_d"], 128), min(cfg["split_do"], 128)
            # odd D: one address per element on top (margin KD's two cosine tiles spilled 40-760 B, the forward
            # 16-104 B at 256 resident columns, Triton 3.9): 64 resident, steps and blocks of 32 and 64
            odd = dict(cfg.get("odd", {}), full_d=64, split_do=64, block_d=32)
            if kernel == "kd_forward" and klass == "hopper":
                odd.update(BLOCK_B=16)  # the mma.sync row tile
            cfg["odd"] = odd
    odd = cfg.pop("odd", {})
    if not (D % 16 == 0 if aligned is None else aligned):
        cfg.update(odd)
    cfg["BLOCK_C"] = max(16 if subcenters == 1 else 1, cfg["BLOCK_C"] // triton.next_power_of_2(subcenters))
    if subcenters > 1 and gpu_tiles():  # 512 resident columns and sub-centers spilled on sm_100 (Triton 3.9)
        cfg["full_d"] = min(cfg["full_d"], 256)
    if subcenters > 1 and gpu_tiles() and op != torch.float64:  # the (B, C, K) max tile: 4 warps spill on sm_80
        cfg["num_warps"] = 8
        if op == torch.float32:  # and two stages of fp32 spilled on Hopper and sm_100 (Triton 3.7, 3.8)
            cfg["num_stages"] = 1
    if update and gpu_tiles() and (arch_class(arch) == "hopper" or subcenters > 1):
        # the fused center update holds the state tiles too: the 64-row wgmma tile spilled 16-480 B at 128 resident
        # columns on sm_90 (K = 1, 4 and 8), and sub-center tiles 80-128 B at odd D in two phases on sm_80 (Triton
        # 3.9): half the rows
        cfg["BLOCK_C"] = max(16 if subcenters == 1 else 1, cfg["BLOCK_C"] // 2)
    if update and gpu_tiles() and not (D % 16 == 0 if aligned is None else aligned):
        cfg["split_do"] = min(cfg["split_do"], 64)  # odd D, two phases: AdamW spilled 16 B at 128 columns on sm_100
    full_d, split_do, block_d = cfg.pop("full_d"), cfg.pop("split_do"), cfg.pop("block_d", 64)
    d_pad = triton.next_power_of_2(max(D, 16))
    if d_pad <= full_d:
        return dict(cfg, BLOCK_D=d_pad, BLOCK_DO=d_pad, FULL_D=True)
    return dict(cfg, BLOCK_D=block_d, BLOCK_DO=split_do, FULL_D=False)


# ---- the launch space: every tile a GPU launch can get, for the compile check (mdkernels.tools.gpu_compile) ----------
# The (input dtype, dot operand dtype) paths of a GPU launch: 16-bit, fp32 (tf32x3), fp32 under autocast, fp64 (IEEE
# dots on small tiles: a checking mode, the suite's exact dtype)
GPU_DTYPE_PATHS = ((torch.bfloat16, None), (torch.float16, None), (torch.float32, None),
                   (torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.float64, None))  # fmt: skip
GPU_ARCHS = (80, 86, 89, 90, 100, 120)  # A100; RTX 30xx, A10, A40; RTX 40xx, L4, L40S; H100, H200; B200; RTX 50xx
MAX_SUBCENTERS = 16  # K: the fused ops' limit (mdkernels._validate), so that KP = next_pow2(K) <= 16
SPACE_B = (1, 8192)  # the batch sizes and embedding sizes the compile check stands for
SPACE_D = (64, 1024)
# One K per KP = next_pow2(K): K is a runtime integer of the kernels, which compile once per KP
SUBCENTER_REPRESENTATIVES = (1, 2, 3, 5, 9)


def shape_representatives(small_rows: int = HOPPER_MIN_ROWS) -> list[tuple[int, int, str]]:
    """``(B, D, specialisation)`` standing for every B in :data:`SPACE_B` and D in :data:`SPACE_D`: the tiles depend on
    B only through ``B < small_rows`` and on D only through ``next_pow2(D)`` and ``D % 16`` (test_gpu_compile walks
    every B and D to show it), and a launch specialises D and the strides (B, C and K never: the kernels' ``do_not_specialize``):
    "aligned" (D a multiple of 16, the vector loads' hint), "odd" (D = next_pow2 - 12: no hint)."""
    out = []
    d = SPACE_D[0]
    while d <= SPACE_D[1]:
        odd_d = d - 12 if d - 12 >= max(SPACE_D[0], d // 2 + 1) else None  # same next_pow2, not a multiple of 16
        for rows in (small_rows // 2, 1024):
            out.append((rows, d, "aligned"))
            if odd_d is not None:
                out.append((rows, odd_d, "odd"))
        d *= 2
    return out


def tile_representative(B: int, D: int, small_rows: int = HOPPER_MIN_ROWS) -> tuple[int, int]:
    """The representative of (B, D) in :func:`shape_representatives` with the same tiles: B = 32 or 1024; D =
    next_pow2(D) when D is a multiple of 16, else next_pow2(D) - 12."""
    d_pad = triton.next_power_of_2(max(D, 16))
    return (small_rows // 2 if B < small_rows else 1024), (d_pad if D % 16 == 0 else d_pad - 12)


def gemm_units(dtype: torch.dtype, D: int, arch: int, trainable: bool = True, B: int = 1024, kd: bool = False) -> int:
    """The GEMM work of one fused step in units of the ``B x C x D`` product, as the default tiles run it: the
    forward builds the cosines once per column block of D it owns (``cdiv(D, BLOCK_DO)``; 1 when D is
    resident) and accumulates ``P . n(W)`` once; the center gradient (``trainable``) the same over its own
    column blocks. 4 is the floor of a trainable step, 2 of a frozen one (the cosines and ``o_bar``)."""
    fwd = tile_config("kd_forward" if kd else "forward", dtype, B, D, arch=arch)
    units = (1 if fwd["FULL_D"] else -(-D // fwd["BLOCK_DO"])) + 1
    if trainable:
        bwd = tile_config("kd_center_grad" if kd else "center_grad", dtype, B, D, arch=arch)
        units += (1 if bwd["FULL_D"] else -(-D // bwd["BLOCK_DO"])) + 1
    return units
