"""Triton backend of the fused margin CE (see :mod:`mdkernels.ops.margin_ce.op` for the design).

``_margin_ce_forward_kernel``: one program per (row tile, class split, column block of D). Per class tile:
the cosines, the online max / sum-exp of the non-target logits and, when the embeddings need a gradient,
``O = O * alpha + P . n(W)`` with ``P = exp(z - m)`` in [0, 1] cast to the input dtype for the dot. With
``FULL_D`` the row tile and one center tile over all of D are the only loads, and the normalised center
tile serves both dots; above that, D is split over the grid's third axis and each program builds the
cosines over all of D in steps.

``_margin_ce_center_grad_kernel``: one program per (class tile, column block of D), looping over every
row tile: cosines again, ``G = dL/dc`` (target term included), ``acc += G^T . n(x)`` and ``dot += sum_i G c``,
then :func:`mdkernels.ops._common.tiles.center_grad_epilogue` writes the tile's ``dW`` once. No atomics.
"""

from __future__ import annotations

import torch

from mdkernels._cuda_ext import guard_device
from mdkernels._math import compute_dtype
from mdkernels.ops._common.autotune import autotuned
from mdkernels.ops._common.env import HAS_TRITON, LAUNCH_OPTIONS, NEG_BIG, capability, gpu_like, num_sms, ptr
from mdkernels.ops._common.epilogue import grad_scale, merge_splits
from mdkernels.ops._common.margin import NonTarget
from mdkernels.ops._common.tiles import (
    GPU_DTYPE_PATHS,
    SUBCENTER_REPRESENTATIVES,
    shape_representatives,
    tile_config,
    triton_flags,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from mdkernels.ops._common.tiles import (
        as_operand,
        center_grad_epilogue,
        center_update_epilogue,
        center_update_states,
        center_update_weights,
        cos_tile,
        load_tile,
        logits,
        normalised,
        spread_rows,
        spread_rows_cm,
        subcenter_tile,
        subcenter_tile_cm,
    )

    _NEG_BIG = tl.constexpr(NEG_BIG)  # globals read inside @triton.jit must be constexpr

    @triton.jit
    def _weight_rows(cols, col_mask, BLOCK_C: tl.constexpr, K, KP: tl.constexpr):
        """The weight rows of a class tile: ``c*K + k`` for ``k < K`` (class-major), ``BLOCK_C * KP`` of them."""
        if KP == 1:
            return cols, col_mask
        ks = tl.arange(0, KP)
        wr = tl.reshape(cols[:, None] * K + ks[None, :], (BLOCK_C * KP,))
        return wr, tl.reshape(col_mask[:, None] & (ks < K)[None, :], (BLOCK_C * KP,))

    # Launches never specialise on these integers (a value of 1 or a multiple of 16 would compile another kernel): the
    # batch, the class counts and K only bound loops and masks. D and the strides keep their hints (vector loads).
    _ANY_VALUE = ("B", "C", "classes_per_split", "K", "nesterov", "first", "maximize")

    @triton.jit(do_not_specialize=_ANY_VALUE)
    def _margin_ce_forward_kernel(
        X, W, RX, RW, Y, PHI, T, M_OUT, L_OUT, O_OUT, B, C, D, stride_x, stride_xc, stride_w, stride_wc,
        classes_per_split, s, tau, bound, HAS_FILTER: tl.constexpr, CURRICULAR: tl.constexpr, K,
        KP: tl.constexpr, NEED_O: tl.constexpr, FULL_D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr, ACC_DTYPE: tl.constexpr, OP_DTYPE: tl.constexpr,
        ROUND: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        """Per (row tile, class split, D block): running max ``M``, sum-exp ``L`` and ``O`` (unnormalised,
        relative to ``M``) of the non-target logits of the split. ``C`` counts classes (K weight rows each)."""
        pid_b = tl.program_id(0)
        pid_s = tl.program_id(1)
        pid_d = tl.program_id(2)
        rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        row_mask = rows < B
        y = tl.load(Y + rows, mask=row_mask, other=-1)
        rx = tl.load(RX + rows, mask=row_mask, other=0.0)
        phi = rx
        t = 0.0
        if CURRICULAR:
            phi = tl.load(PHI + rows, mask=row_mask, other=0.0)
            t = tl.load(T)
        dd = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
        d_mask = dd < D
        if FULL_D:  # the row tile, normalised once: both kernels build FULL_D cosines from n(x) . n(W)^T
            xn = normalised(load_tile(X, rows, row_mask, dd, d_mask, stride_x, stride_xc), rx, OP_DTYPE, ROUND)
        m = tl.full((BLOCK_B,), _NEG_BIG, dtype=ACC_DTYPE)
        l = tl.zeros((BLOCK_B,), dtype=ACC_DTYPE)
        o = tl.zeros((BLOCK_B, BLOCK_DO), dtype=ACC_DTYPE)
        c_begin = pid_s * classes_per_split
        c_end = tl.minimum(c_begin + classes_per_split, C)
        for c0 in range(c_begin, c_end, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            col_mask = cols < c_end
            wr, wr_mask = _weight_rows(cols, col_mask, BLOCK_C, K, KP)
            rw = tl.load(RW + wr, mask=wr_mask, other=0.0)
            if FULL_D:
                wn = normalised(load_tile(W, wr, wr_mask, dd, d_mask, stride_w, stride_wc), rw, OP_DTYPE, ROUND)
                raw = tl.dot(xn, tl.trans(wn), input_precision=PRECISION, out_dtype=ACC_DTYPE)
            else:
                raw = cos_tile(X, W, RX, RW, rows, wr, row_mask, wr_mask, D, stride_x, stride_xc, stride_w, stride_wc,
                               BLOCK_B, BLOCK_C * KP, BLOCK_D, ACC_DTYPE, OP_DTYPE, ROUND, PRECISION)  # fmt: skip
            if KP > 1:
                raw, kidx = subcenter_tile(raw, BLOCK_B, BLOCK_C, K, KP)
            live = (cols[None, :] != y[:, None]) & col_mask[None, :]
            z, keep, slope = logits(raw, live, s, tau, bound, phi[:, None], t, HAS_FILTER, CURRICULAR)
            m_new = tl.maximum(m, tl.max(z, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(z - m_new[:, None])
            l = l * alpha + tl.sum(p, 1)
            if NEED_O:
                if not FULL_D:
                    wn = normalised(load_tile(W, wr, wr_mask, dd, d_mask, stride_w, stride_wc), rw, OP_DTYPE, ROUND)
                p = tl.where(keep, p, 0.0)  # in [0, 1] (times CurricularFace's slope, at most 3)
                if CURRICULAR:
                    p = p * slope
                if KP > 1:
                    p = spread_rows(p, kidx, BLOCK_B, BLOCK_C, KP)
                o = o * alpha[:, None] + tl.dot(as_operand(p, OP_DTYPE, ROUND), wn, input_precision=PRECISION,
                                                out_dtype=ACC_DTYPE)  # fmt: skip
            m = m_new
        if pid_d == 0:
            tl.store(M_OUT + pid_s * B + rows, m, mask=row_mask)
            tl.store(L_OUT + pid_s * B + rows, l, mask=row_mask)
        if NEED_O:
            base = O_OUT + (pid_s * B + rows[:, None]).to(tl.int64) * D + dd[None, :]
            tl.store(base, o, mask=row_mask[:, None] & d_mask[None, :])

    @triton.jit
    def _center_grad_sums(X, W, RX, RW, Y, LSE, GR, COEF, KT, PHI, B, D, stride_x, stride_xc, stride_w, stride_wc, s,
                          tau, bound, cols, col_mask, wr, wr_mask, rw, wn, dd, d_mask, gscale, t,
                          HAS_FILTER: tl.constexpr, CURRICULAR: tl.constexpr, K, KP: tl.constexpr,
                          FULL_D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                          BLOCK_DO: tl.constexpr, ACC_DTYPE: tl.constexpr, OP_DTYPE: tl.constexpr,
                          ROUND: tl.constexpr, PRECISION: tl.constexpr):  # fmt: skip
        """A class tile against every row: ``(acc, dot)``, the (scaled) ``G^T n(x)`` of the columns ``dd`` and
        ``sum_i G_ij c_ij``. ``wn``: the normalised class tile (FULL_D), else unused (the cosines over all of D
        from ``W`` in steps)."""
        acc = tl.zeros((BLOCK_C * KP, BLOCK_DO), dtype=ACC_DTYPE)
        dot = tl.zeros((BLOCK_C * KP,), dtype=ACC_DTYPE)
        for r0 in range(0, B, BLOCK_B):
            rows = r0 + tl.arange(0, BLOCK_B)
            row_mask = rows < B
            gr = tl.load(GR + rows, mask=row_mask, other=0.0)
            if tl.max(tl.abs(gr), 0) != 0:  # row tiles of ignored rows (zero weight) contribute nothing
                y = tl.load(Y + rows, mask=row_mask, other=-1)
                lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
                coef = tl.load(COEF + rows, mask=row_mask, other=0.0)
                rx = tl.load(RX + rows, mask=row_mask, other=0.0)
                phi = rx
                if CURRICULAR:
                    phi = tl.load(PHI + rows, mask=row_mask, other=0.0)
                xn = normalised(load_tile(X, rows, row_mask, dd, d_mask, stride_x, stride_xc), rx, OP_DTYPE, ROUND)
                if FULL_D:
                    raw_k = tl.dot(wn, tl.trans(xn), input_precision=PRECISION, out_dtype=ACC_DTYPE)
                else:
                    raw_k = cos_tile(W, X, RW, RX, wr, rows, wr_mask, row_mask, D, stride_w, stride_wc, stride_x,
                                     stride_xc, BLOCK_C * KP, BLOCK_B, BLOCK_D, ACC_DTYPE, OP_DTYPE, ROUND,
                                     PRECISION)  # fmt: skip
                raw = raw_k
                if KP > 1:
                    raw, kidx = subcenter_tile_cm(raw_k, BLOCK_C, BLOCK_B, K, KP)
                target = (cols[:, None] == y[None, :]) & col_mask[:, None]
                live = ~target & col_mask[:, None] & row_mask[None, :]
                z, keep, slope = logits(raw, live, s, tau, bound, phi[None, :], t, HAS_FILTER, CURRICULAR)
                # masked entries are exp(-inf) = 0 before any product: the un-margined target may overflow
                g = tl.where(keep, tl.exp(z - lse[None, :]) * (s * gr)[None, :], 0.0)
                if CURRICULAR:
                    g = g * slope
                g = tl.where(target, coef[None, :], g)
                if KP > 1:  # each class's entry to its argmax sub-center; the target's to the sub-center it used
                    kt = tl.load(KT + rows, mask=row_mask, other=0).to(tl.int32)
                    g = spread_rows_cm(g, tl.where(target, kt[None, :], kidx), BLOCK_C, BLOCK_B, KP)
                dot += tl.sum(g * raw_k, 1)
                acc += tl.dot(as_operand(g / gscale, OP_DTYPE, ROUND), xn, input_precision=PRECISION,
                              out_dtype=ACC_DTYPE)  # fmt: skip
        return acc, dot

    @triton.jit(do_not_specialize=_ANY_VALUE)
    def _margin_ce_center_grad_kernel(
        X, W, RX, RW, Y, LSE, GR, COEF, KT, PHI, T, GSCALE, DW, B, C, D, stride_x, stride_xc, stride_w, stride_wc,
        stride_dw, stride_dwc, s, tau, bound, HAS_FILTER: tl.constexpr, CURRICULAR: tl.constexpr, K,
        KP: tl.constexpr, FULL_D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_DO: tl.constexpr, ACC_DTYPE: tl.constexpr, OP_DTYPE: tl.constexpr, ROUND: tl.constexpr,
        PRECISION: tl.constexpr, S1=None, S2=None, INV=None, FOUND=None, lr=0.0, wd=0.0, mom=0.0, damp=0.0,
        nesterov=0, first=0, maximize=0, beta1=0.0, beta2=0.0, eps=0.0, step_size=0.0, bc2_sqrt=1.0,
        UPDATE: tl.constexpr = 0, SCALED: tl.constexpr = False, TWO_PHASE: tl.constexpr = False,
    ):  # fmt: skip
        """One (class tile, D block): ``dW`` of its centers (``BLOCK_C * K`` weight rows) from every row,
        written once. Class-major: every tile is (classes, rows), so that both products have the class tile
        as M (64-row wgmma on Hopper whatever the batch).

        ``UPDATE`` (1: SGD, 2: AdamW): the optimizer step applied to ``W`` and its state ``S1``, ``S2`` instead of
        writing ``DW``. With D resident (FULL_D) the one program of the class tile reads its rows and then writes
        them (:func:`mdkernels.ops._common.tiles.center_update_epilogue`). ``TWO_PHASE`` (D split; the grid has one
        program per class tile): the program walks the column blocks itself, writing only the state of each (which
        no cosine reads), and moves the centers in a last pass once every cosine is done."""
        pid_c = tl.program_id(0)
        pid_d = tl.program_id(1)
        cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        col_mask = cols < C
        wr, wr_mask = _weight_rows(cols, col_mask, BLOCK_C, K, KP)
        rw = tl.load(RW + wr, mask=wr_mask, other=0.0)
        gscale = tl.load(GSCALE)
        t = 0.0
        if CURRICULAR:
            t = tl.load(T)
        if TWO_PHASE:
            for d0 in range(0, D, BLOCK_DO):
                dd = d0 + tl.arange(0, BLOCK_DO)
                d_mask = dd < D
                acc, dot = _center_grad_sums(X, W, RX, RW, Y, LSE, GR, COEF, KT, PHI, B, D, stride_x, stride_xc,
                                             stride_w, stride_wc, s, tau, bound, cols, col_mask, wr, wr_mask, rw, rw, dd,
                                             d_mask, gscale, t, HAS_FILTER, CURRICULAR, K, KP, FULL_D, BLOCK_B,
                                             BLOCK_C, BLOCK_D, BLOCK_DO, ACC_DTYPE, OP_DTYPE, ROUND,
                                             PRECISION)  # fmt: skip
                wt = load_tile(W, wr, wr_mask, dd, d_mask, stride_w, stride_wc)
                center_update_states(acc, dot, gscale, wt, rw, wr, wr_mask, dd, d_mask, W, S1, S2, stride_w,
                                     stride_wc, wd, mom, damp, first, maximize, beta1, beta2, UPDATE)  # fmt: skip
            for d0 in range(0, D, BLOCK_DO):  # every cosine of the tile is done: the centers move
                dd = d0 + tl.arange(0, BLOCK_DO)
                center_update_weights(wr, wr_mask, dd, dd < D, W, S1, S2, stride_w, stride_wc, lr, wd, eps, step_size,
                                      bc2_sqrt, UPDATE)  # fmt: skip
        else:
            dd = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
            d_mask = dd < D
            wn = rw
            if FULL_D:  # the class tile, normalised once, serves every row tile's cosines
                wn = normalised(load_tile(W, wr, wr_mask, dd, d_mask, stride_w, stride_wc), rw, OP_DTYPE, ROUND)
            acc, dot = _center_grad_sums(X, W, RX, RW, Y, LSE, GR, COEF, KT, PHI, B, D, stride_x, stride_xc, stride_w,
                                         stride_wc, s, tau, bound, cols, col_mask, wr, wr_mask, rw, wn, dd, d_mask,
                                         gscale, t, HAS_FILTER, CURRICULAR, K, KP, FULL_D, BLOCK_B, BLOCK_C, BLOCK_D,
                                         BLOCK_DO, ACC_DTYPE, OP_DTYPE, ROUND, PRECISION)  # fmt: skip
            wt = load_tile(W, wr, wr_mask, dd, d_mask, stride_w, stride_wc)  # reloaded: not held over the loop
            if UPDATE == 0:
                center_grad_epilogue(acc, dot, gscale, wt, rw, wr, wr_mask, dd, d_mask, DW, stride_dw, stride_dwc)
            else:
                center_update_epilogue(acc, dot, gscale, wt, rw, wr, wr_mask, dd, d_mask, W, S1, S2, stride_w,
                                       stride_wc, INV, FOUND, lr, wd, mom, damp, nesterov, first, maximize, beta1,
                                       beta2, eps, step_size, bc2_sqrt, UPDATE, SCALED)  # fmt: skip


FORCE_SPLITS: int | None = None  # tests: force this many class splits (split-C) on any device


def _splits(x: torch.Tensor, row_tiles: int, class_tiles: int) -> int:
    """Class splits: enough programs to fill the GPU when the batch alone gives few row tiles."""
    if FORCE_SPLITS is not None:
        return max(1, min(class_tiles, FORCE_SPLITS))
    return max(1, min(class_tiles, (4 * num_sms(x.device)) // max(row_tiles, 1))) if gpu_like(x) else 1


def _options(nt: NonTarget, x: torch.Tensor) -> tuple[dict, tuple]:
    """The kernels' constexprs and the (PHI, T) pointers of the non-target options (dummies when off)."""
    K = nt.K
    const = dict(HAS_FILTER=nt.tau is not None, CURRICULAR=nt.t is not None, K=K, KP=triton.next_power_of_2(K))
    curricular = (nt.phi.contiguous(), nt.t.reshape(1).contiguous()) if nt.t is not None else (x, x)
    return const, curricular


@guard_device
def forward(x, w, labels, rx, rw, s, nt: NonTarget, need_o, op_dtype=None):
    """``(lse_nt, o)`` as :func:`mdkernels.ops.margin_ce.torch_backend.forward`. ``op_dtype``: the dots'
    operand dtype (autocast's, for fp32 inputs), default the inputs' own. Any strides."""
    B, D = x.shape
    C = w.shape[0] // nt.K
    cd = compute_dtype(x)
    flags = triton_flags(x.dtype, x.is_cuda, op_dtype)
    const, (phi, t) = _options(nt, x)

    def launch(cfg):
        row_tiles, class_tiles = triton.cdiv(B, cfg["BLOCK_B"]), triton.cdiv(C, cfg["BLOCK_C"])
        splits = _splits(x, row_tiles, class_tiles)
        per_split = triton.cdiv(class_tiles, splits) * cfg["BLOCK_C"]
        splits = triton.cdiv(C, per_split)
        d_splits = triton.cdiv(D, cfg["BLOCK_DO"]) if need_o else 1
        m = torch.empty(splits, B, dtype=cd, device=x.device)
        l = torch.empty_like(m)
        o = torch.empty(splits, B, D, dtype=cd, device=x.device) if need_o else m
        _margin_ce_forward_kernel[(row_tiles, splits, d_splits)](
            x, w, rx, rw, labels, phi, t, m, l, o, B, C, D, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
            per_split, float(s), float(nt.tau if nt.tau is not None else 0.0), float(nt.cos_clamp), NEED_O=need_o,
            **const, **flags, **cfg, **LAUNCH_OPTIONS,
        )  # fmt: skip
        return m, l, o

    m, l, o = launch(autotuned("forward", x, B, C, D, launch, subcenters=nt.K, op_dtype=op_dtype))
    return merge_splits(m, l, o if need_o else None, s)


WINDOWS = 20  # the fused center update through a window: the gradient of at most ~1/WINDOWS of the classes at a time
FORCE_WINDOWED = False  # tests: the window even where the update could run in the kernel


def _mode(step, x: torch.Tensor, cfg: dict) -> str:
    """Where the fused update runs: ``"epilogue"`` (D resident: the class tile's one program reads its rows, then
    writes them), ``"two_phase"`` (D split: one program per class tile walks its column blocks, writing only state
    until its cosines are done; SGD with momentum and without nesterov, whose step needs only the new buffer, and
    AdamW, without a GradScaler, whose skip of a whole row needs all its columns first) or ``"window"``. The kernel
    needs the rows to be the centers' own (no sampled gather), host floats for every per-step number, and centers
    that are not fp64 (its scalars are fp32: fp64 centers take the window, whose update runs in fp64)."""
    if FORCE_WINDOWED or step.index is not None or not step.host_scalars or x.dtype == torch.float64:
        return "window"
    if cfg["FULL_D"]:
        return "epilogue"
    two_phase = step.kind == "adamw" or (step.momentum != 0 and not step.nesterov)
    return "two_phase" if two_phase and step.inv_scale is None else "window"


def _center_step(x, w, labels, rx, rw, lse, gr, coef, raw_t, s, nt: NonTarget, op_dtype, step) -> None:
    """The fused center update (``step``). In the kernel where :func:`_mode` says so; otherwise D is split over
    programs that all read a class tile's whole rows for their cosines, so none of them may overwrite those rows:
    the gradient of a window of classes goes to a scratch (at most ~C/WINDOWS rows, or enough class tiles to fill
    the GPU), then the update is applied to the window, in stream order, before the next window's kernel reads its
    own (other) rows. No program ever reads a row another has written."""
    B, D = x.shape
    K = nt.K
    C = w.shape[0] // K
    cfg = tile_config("center_grad", x.dtype, B, D, K, arch=capability(x.device), op_dtype=op_dtype, update=True)
    if not (B and C):
        return
    mode = _mode(step, x, cfg)
    if mode == "window":
        fill = 4 * num_sms(x.device) * cfg["BLOCK_C"] if gpu_like(x) else cfg["BLOCK_C"]
        win = triton.cdiv(max(triton.cdiv(C, WINDOWS), fill), cfg["BLOCK_C"]) * cfg["BLOCK_C"]
        for c0 in range(0, C, win):
            c1 = min(C, c0 + win)
            here = torch.where((labels >= c0) & (labels < c1), labels - c0, torch.full_like(labels, -1))
            dw = center_grad(x, w[c0 * K : c1 * K], here, rx, rw[c0 * K : c1 * K], lse, gr, coef, raw_t, s, nt,
                             op_dtype=op_dtype)  # fmt: skip
            step.apply_rows(c0 * K, c1 * K, dw)
        return
    gscale = grad_scale(gr, coef, s).to(rx.dtype)
    const, (phi, t) = _options(nt, x)
    kt = nt.kt.contiguous() if nt.kt is not None else labels
    s1 = step.states[0] if step.states else w
    s2 = step.states[1] if len(step.states) > 1 else w
    scaled = step.inv_scale is not None
    found = torch.zeros(1, dtype=torch.int32, device=x.device) if scaled else None
    two_phase = mode == "two_phase"
    grid = (triton.cdiv(C, cfg["BLOCK_C"]), 1 if two_phase else triton.cdiv(D, cfg["BLOCK_DO"]))
    _margin_ce_center_grad_kernel[grid](
        x, w, rx, rw, labels, lse, gr, coef, kt, phi, t, gscale, w, B, C, D, x.stride(0), x.stride(1),
        w.stride(0), w.stride(1), w.stride(0), w.stride(1), float(s), float(nt.tau if nt.tau is not None else 0.0),
        float(nt.cos_clamp), S1=s1, S2=s2, INV=step.inv_scale, FOUND=found, lr=step.lr,
        wd=step.weight_decay, mom=step.momentum, damp=step.dampening, nesterov=int(step.nesterov),
        first=int(step.first), maximize=int(step.maximize), beta1=step.beta1, beta2=step.beta2, eps=step.eps,
        step_size=float(step.step_size), bc2_sqrt=float(step.bc2_sqrt), UPDATE=1 if step.kind == "sgd" else 2,
        SCALED=scaled, TWO_PHASE=two_phase, **const, **triton_flags(x.dtype, x.is_cuda, op_dtype), **cfg,
        **LAUNCH_OPTIONS,
    )  # fmt: skip
    if scaled:
        torch.maximum(step.found_inf, found[0].to(step.found_inf.dtype), out=step.found_inf)


@guard_device
def center_grad(x, w, labels, rx, rw, lse, gr, coef, raw_t, s, nt: NonTarget, op_dtype=None, step=None):
    """``dL/dW`` (C K, D) in the centers' dtype and layout, as
    :func:`mdkernels.ops.margin_ce.torch_backend.center_grad`; with ``step`` (the fused center update) the
    update is applied instead and nothing is returned (:func:`_center_step`)."""
    if step is not None:
        return _center_step(x, w, labels, rx, rw, lse, gr, coef, raw_t, s, nt, op_dtype, step)
    B, D = x.shape
    C = w.shape[0] // nt.K
    dw = torch.empty_like(w)  # the centers' strides: a (D, C) parameter's view gets its gradient in place
    gscale = grad_scale(gr, coef, s).to(rx.dtype)
    flags = triton_flags(x.dtype, x.is_cuda, op_dtype)
    const, (phi, t) = _options(nt, x)
    kt = nt.kt.contiguous() if nt.kt is not None else labels

    def launch(cfg):
        grid = (triton.cdiv(C, cfg["BLOCK_C"]), triton.cdiv(D, cfg["BLOCK_DO"]))
        _margin_ce_center_grad_kernel[grid](
            x, w, rx, rw, labels, lse, gr, coef, kt, phi, t, gscale, dw, B, C, D, x.stride(0), x.stride(1),
            w.stride(0), w.stride(1), dw.stride(0), dw.stride(1), float(s),
            float(nt.tau if nt.tau is not None else 0.0), float(nt.cos_clamp), **const, **flags, **cfg,
            **LAUNCH_OPTIONS,
        )  # fmt: skip

    if C and B:
        launch(autotuned("center_grad", x, B, C, D, launch, subcenters=nt.K, op_dtype=op_dtype))
    else:
        dw.zero_()
    return dw


_UPDATE_FLOATS = ("lr", "wd", "mom", "damp", "beta1", "beta2", "eps", "step_size", "bc2_sqrt")


def launch_specs(arch: int) -> list:
    """Every kernel a GPU launch on ``sm_<arch>`` can compile, one per distinct tile (see
    :mod:`mdkernels.tools.gpu_compile`): each dtype path (:data:`tiles.GPU_DTYPE_PATHS`), each K class, each (B, D)
    representative with its specialisation (:func:`tiles.shape_representatives`), the tile the launcher's own
    :func:`tiles.tile_config` gives, and the options that add code (filter, CurricularFace, O, K < KP) all on: the
    most registers a tile can need. K is a runtime integer: one kernel per KP = next_pow2(K). (name, kernel, runtime signature, constexprs, options, integers seen as multiples
    of 16.)"""
    specs = []
    for dtype, op in GPU_DTYPE_PATHS:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        common = {"X": ptr(dtype), "W": ptr(dtype), "RX": ptr(acc), "RW": ptr(acc), "Y": "*i64", "PHI": ptr(acc),
                  "T": ptr(acc), "B": "i32", "C": "i32", "D": "i32", "stride_x": "i32", "stride_w": "i32",
                  "s": "fp32", "tau": "fp32", "bound": "fp32", "K": "i32"}  # fmt: skip
        fwd = {**common, "M_OUT": ptr(acc), "L_OUT": ptr(acc), "O_OUT": ptr(acc), "classes_per_split": "i32"}
        bwd = {**common, "LSE": ptr(acc), "GR": ptr(acc), "COEF": ptr(acc), "KT": "*i64", "GSCALE": ptr(acc),
               "DW": ptr(dtype), "stride_dw": "i32", **dict.fromkeys(_UPDATE_FLOATS, "fp32"),
               **dict.fromkeys(("nesterov", "first", "maximize"), "i32")}  # fmt: skip
        update = {"S1": ptr(dtype), "S2": ptr(dtype), "INV": "*fp32", "FOUND": "*i32"}
        path = str(dtype).removeprefix("torch.") + (f" amp-{str(op).removeprefix('torch.')}" if op else "")
        for K in SUBCENTER_REPRESENTATIVES:
            for B, D, kind in shape_representatives():
                const = {"HAS_FILTER": True, "CURRICULAR": True, "KP": triton.next_power_of_2(K), "stride_xc": 1,
                         "stride_wc": 1, **triton_flags(dtype, True, op)}  # fmt: skip
                name = f"{path} KP={triton.next_power_of_2(K)} B={B} D={D} {kind}"
                unfused = {"stride_dwc": 1, "UPDATE": 0, "SCALED": False, "TWO_PHASE": False, **dict.fromkeys(update)}
                variants = [("forward", "", _margin_ce_forward_kernel, fwd, {"NEED_O": True}),
                            ("center_grad", "", _margin_ce_center_grad_kernel, bwd, unfused)]  # fmt: skip
                # the fused center update (fp64 takes the window): in the epilogue where D is resident, with or
                # without a GradScaler; two-phase where D is split, without one
                resident = tile_config("center_grad", dtype, B, D, K, arch=arch, op_dtype=op, update=True)["FULL_D"]
                kinds = ((1, False), (1, True), (2, False), (2, True)) if resident else ((1, False), (2, False))
                for u, scaled in kinds if dtype != torch.float64 else ():
                    sig = {**bwd, **(update if scaled else {k: update[k] for k in ("S1", "S2")})}
                    extra = {"stride_dwc": 1, "UPDATE": u, "SCALED": scaled, "TWO_PHASE": not resident,
                             **({} if scaled else {"INV": None, "FOUND": None})}  # fmt: skip
                    tag = f" update={'sgd' if u == 1 else 'adamw'}{' scaled' if scaled else ''}"
                    variants.append(("center_grad", tag, _margin_ce_center_grad_kernel, sig, extra))
                for kernel, tag, fn, sig, extra in variants:
                    cfg = tile_config(kernel, dtype, B, D, K, arch=arch, op_dtype=op, update=bool(tag))
                    opts = {"num_warps": cfg.pop("num_warps"), "num_stages": cfg.pop("num_stages")}
                    ints = {"D": D, "stride_x": D, "stride_w": D, "stride_dw": D}  # B, C, K: never specialised
                    specs.append((f"margin_ce_{kernel} {name}{tag}", fn, sig, {**const, **extra, **cfg}, opts,
                                  {k: v for k, v in ints.items() if k in sig}))  # fmt: skip
    return specs
