"""Helpers of the chunked torch backends (the CPU path of the margin ops): a chunk's logits, its targets,
the center-gradient loop, and the normalisation backward of center rows as one coefficient per row.

Where the CPU module was built (``mdkernels._cpu``, csrc/cpu/margin_cpu.cpp), a margin-CE chunk's
elementwise passes run as one C++ sweep per row (:func:`fused_epilogue`); the torch passes here are the
fallback and the reference the C++ is tested against.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from mdkernels._math import EPS
from mdkernels.ops._common.env import values_at_hand
from mdkernels.ops._common.margin import NonTarget

try:  # built by setup.py with the host compiler (MDK_BUILD_CPU=AUTO|ON)
    from mdkernels import _cpu as cpu_ext
except ImportError:  # a pure-Python install
    cpu_ext = None

CHUNK_ELEMENTS = 1 << 19  # B x chunk logits per step: 2 MB in fp32 (measured: 1.1x faster than 4 MB at B=256)
USE_CPU_EXT = True  # set False to run the torch passes where the C++ epilogue would run (tests compare both)


def fused_epilogue(t: torch.Tensor) -> bool:
    """True when the C++ chunk epilogue runs for these CPU tensors (fp32/fp64, module built, enabled)."""
    return USE_CPU_EXT and cpu_ext is not None and t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)


def chunk_targets(labels: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
    """Per row, the target's column in the chunk ``[c0, c1)``, or -1 (int64, contiguous)."""
    inside = (labels >= c0) & (labels < c1)
    return torch.where(inside, labels - c0, torch.full_like(labels, -1)).contiguous()


def chunk_size(B: int, C: int) -> int:
    return max(256, min(C, CHUNK_ELEMENTS // max(B, 1)))


def chunks(B: int, C: int):
    """``(c0, c1)`` class ranges of about ``CHUNK_ELEMENTS / B`` classes."""
    step = chunk_size(B, C)
    for c0 in range(0, C, step):
        yield c0, min(C, c0 + step)


def put_at_targets(m: torch.Tensor, tcol: torch.Tensor, values) -> torch.Tensor:
    """``m[i, tcol[i]] = values[i]`` (or the scalar ``values``) for the rows with ``tcol[i] >= 0``, in place and
    without a host sync (a gather, a select and a scatter: every row writes its own entry back unchanged)."""
    idx = tcol.clamp_min(0)[:, None]
    new = values[:, None].to(m.dtype) if isinstance(values, torch.Tensor) else torch.full_like(idx, values, dtype=m.dtype)
    return m.scatter_(1, idx, torch.where((tcol >= 0)[:, None], new, m.gather(1, idx)))


def target_cos(x, w, labels, rx, rw, ignore_index):
    """``(valid, safe labels, raw target cosine)``: a gathered dot product per row, O(B*D)."""
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    raw = (x.to(rx.dtype) * w[safe].to(rx.dtype)).sum(1) * rx * rw[safe]
    return valid, safe, raw


class Chunk(NamedTuple):
    """One chunk of classes ``[c0, c1)`` against every row (see :func:`chunk_logits`)."""

    z: torch.Tensor  # (B, n) non-target logits, the targets at -inf
    mx: torch.Tensor  # (B,) an upper bound of each row's z (the row max, or within s of it)
    keep: torch.Tensor | None  # (B, n) entries that pass a gradient; None: every non-target does
    tcol: torch.Tensor  # (B,) each row's target column in the chunk, or -1
    slope: torch.Tensor | None  # (B, n) (dz/dc) / s where it is not 1 (CurricularFace), else None
    raw: torch.Tensor | None  # (B, n) s * c before CurricularFace's modulation (for the dW dot), else None
    kidx: torch.Tensor | None  # (B, n) the sub-center each class's cosine came from (K > 1), else None


def chunk_logits(xs, w, rw, labels, c0, c1, s, nt: NonTarget | None = None) -> Chunk:
    """Classes ``[c0, c1)`` (weight rows ``[c0 K, c1 K)``) against every row, ``xs = s * n(x)``.

    ``z`` is ``s*c`` (c: the max over a class's K sub-centers), clamped to ``[-s b, s b]`` (``b =
    nt.cos_clamp``), CurricularFace's ``c (t + c)`` where ``c > phi_i``, then insightface's filter. The
    clamp and its mask cost a pass only when some ``|c|`` is past the clamp."""
    nt = nt or NonTarget()
    K, lim = nt.K, s * nt.cos_clamp
    z = torch.mm(xs, w[c0 * K : c1 * K].to(xs.dtype).T).mul_(rw[None, c0 * K : c1 * K])
    kidx = None
    if K > 1:
        z, kidx = z.view(z.shape[0], c1 - c0, K).max(2)
    tcol = chunk_targets(labels, c0, c1)
    put_at_targets(z, tcol, -lim)  # in range, and no larger than any clamped non-target: neutral for the checks below
    lo, mx = torch.aminmax(z, dim=1)
    keep = slope = raw = None
    # the clamp passes no gradient outside it. On the CPU its mask costs a pass only when some |c| is past it;
    # on a GPU, looking would be a host sync per chunk, so the mask is always built
    if not values_at_hand(z) or float(lo.min()) < -lim or float(mx.max()) > lim:
        keep = (z >= -lim) & (z <= lim)
        z.clamp_(-lim, lim)
        mx = mx.clamp(-lim, lim)
    if nt.t is not None:  # CurricularFace: hard non-targets c > phi_i become c (t + c), slope t + 2c
        raw = z.clone()
        c = z / s
        hard = c > nt.phi[:, None]
        slope = torch.where(hard, nt.t + 2 * c, torch.ones_like(c))
        z = torch.where(hard, z * (nt.t + c), z)
        mx = z.amax(1)
    if nt.tau is not None:  # non-target cosines above tau count as 0, with no gradient
        high = z > s * nt.tau
        keep = ~high if keep is None else keep & ~high
        z.masked_fill_(high, 0.0)
        mx = z.amax(1)
    put_at_targets(z, tcol, -math.inf)
    return Chunk(z, mx, keep, tcol, slope, raw, kidx)


def spread(e: torch.Tensor, kidx: torch.Tensor | None, K: int) -> torch.Tensor:
    """``(B, n)`` class entries onto the ``(B, n K)`` sub-center rows: each to its argmax sub-center."""
    if kidx is None:
        return e
    out = torch.zeros(*e.shape, K, dtype=e.dtype, device=e.device)
    return out.scatter_(2, kidx[..., None], e[..., None]).view(e.shape[0], -1)


def projection(rw: torch.Tensor, dot: torch.Tensor) -> torch.Tensor:
    """The normalisation backward of center rows as one coefficient per row: with ``dot_j = sum_i G_ij c_ij``
    (``= <n(w_j), dW^_j>``), ``dL/dw_j = (G^T n(x))_j / |w_j| - w_j * projection_j``. Rows of norm below EPS
    are linear in ``n()`` (``w / EPS``): no projection, as :func:`mdkernels.ops.l2norm.normalize_backward`."""
    return torch.where(rw >= 0.5 / EPS, torch.zeros_like(dot), dot * rw * rw)


def center_grad(
    xs: torch.Tensor,
    w: torch.Tensor,
    rw: torch.Tensor,
    labels: torch.Tensor,
    gr: torch.Tensor,
    coef: torch.Tensor,
    raw_t: torch.Tensor,
    s: float,
    nt: NonTarget | None = None,
    lse: torch.Tensor | None = None,
    nontarget: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None,
    logit_sets: int = 1,
    step=None,
) -> torch.Tensor | None:
    """``dL/dW`` (C K, D) in the centers' dtype, written once per chunk of classes; with ``step`` (a
    :class:`mdkernels.ops._common.center_update.Step`) each chunk's gradient is applied to its rows instead and
    nothing of size ``C x D`` is allocated (returns None).

    ``xs = s * n(x)``. The non-target ``E = dL/dc / (gr s)`` of a chunk is ``exp(z - lse)`` times
    CurricularFace's slope (the margin CE: pass ``lse``), or ``nontarget(z, c0, c1)`` from the chunk's
    logits ``z`` (margin KD); the target entry is ``coef`` (on sub-center ``nt.kt``). Then ``dW^ = G^T n(x)``
    and the normalisation backward through ``<n(w_j), dW^_j> = sum_i G_ij c_ij``. ``logit_sets``: how many
    ``(B, n)`` logit chunks ``nontarget`` holds at once (chunks shrink to match)."""
    nt = nt or NonTarget()
    K, cd = nt.K, xs.dtype
    xg = xs * gr[:, None]  # G = E * gr s, so G^T n(x) = E^T xg
    t_e = torch.where(gr != 0, coef / (gr * s), torch.zeros_like(coef))  # the target's E entry
    dw = torch.empty_like(w) if step is None else None
    fused = nontarget is None and nt.plain and fused_epilogue(xs)
    logit_rows = logit_sets * xs.shape[0] * K  # a class's share of a logits chunk: its rows of logits
    scratch = None  # the fused update's chunk gradient: one buffer for every chunk (no fresh pages per chunk)
    if step is not None:
        # half a logits chunk's classes: the chunk's gradient and logits stay a few % of the centers (C = 100k,
        # bench/bench_center_update.py); GEMMs split over classes give the same bits (each class's dot is its own)
        logit_rows *= 2
        scratch = torch.empty(chunk_size(logit_rows, w.shape[0] // K) * K, w.shape[1], dtype=cd, device=w.device)
    for c0, c1 in chunks(logit_rows, w.shape[0] // K):
        r0, r1 = c0 * K, c1 * K  # the chunk's weight rows
        if fused:  # one C++ sweep per row: E * rw in place of the logits, and the per-class dot
            e = torch.mm(xs, w[r0:r1].to(cd).T)
            dot = torch.empty(r1 - r0, dtype=cd, device=w.device)
            tgt = chunk_targets(labels, c0, c1)  # bound to a name: a temporary would be freed before the call
            tau = nt.tau
            cpu_ext.center_grad_rows(cd == torch.float64, e.data_ptr(), rw[r0:r1].data_ptr(), tgt.data_ptr(),
                                     e.shape[0], r1 - r0, float(s), float(s * tau) if tau is not None else 0.0,
                                     tau is not None, lse.data_ptr(), gr.data_ptr(), t_e.data_ptr(),
                                     raw_t.data_ptr(), dot.data_ptr(), torch.get_num_threads())  # fmt: skip
        else:
            ch = chunk_logits(xs, w, rw, labels, c0, c1, s, nt)
            e = torch.sub(ch.z, lse[:, None]).exp_() if nontarget is None else nontarget(ch.z, c0, c1)
            if ch.keep is not None:
                e.masked_fill_(~ch.keep, 0.0)
            if ch.slope is not None:
                e.mul_(ch.slope)
            z = ch.raw if ch.raw is not None else ch.z  # sum_i G_ij c_ij = sum_i gr_i E_ij (s c_ij)
            put_at_targets(z, ch.tcol, 0.0)
            e = spread(e, ch.kidx, K)
            z = spread(z, ch.kidx, K)
            tcol = torch.where(ch.tcol >= 0, ch.tcol * K + (nt.kt if K > 1 else 0), ch.tcol)  # the target's sub-center
            put_at_targets(e, tcol, t_e)
            put_at_targets(z, tcol, s * raw_t)
            dot = torch.mv(z.mul_(e).T, gr)
            e.mul_(rw[None, r0:r1])
        inplace = dw is not None and dw.dtype == cd
        if scratch is not None:
            out = scratch[: r1 - r0]
        else:
            out = dw[r0:r1] if inplace else torch.empty(r1 - r0, w.shape[1], dtype=cd, device=w.device)
        torch.mul(w[r0:r1].to(cd), -projection(rw[r0:r1], dot)[:, None], out=out)
        out.addmm_(e.T, xg)
        if step is not None:  # the chunk's rows are read by no later chunk: updated now, in place
            step.apply_rows(r0, r1, out)
        elif not inplace:
            dw[r0:r1] = out
    return dw
