"""Helpers of the chunked torch backends (the CPU path of the margin ops): a chunk's logits, its targets,
the center-gradient loop, and the normalisation backward of center rows as one coefficient per row.

Where the CPU module was built (``mdkernels._cpu``, csrc/cpu/margin_cpu.cpp), a margin-CE chunk's
elementwise passes run as one C++ sweep per row (:func:`fused_epilogue`); the torch passes here are the
fallback and the reference the C++ is tested against.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from mdkernels._spec import EPS

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


def target_mask(labels, c0, c1):
    """Rows whose label falls in ``[c0, c1)`` and that label's column in the chunk."""
    rows = ((labels >= c0) & (labels < c1)).nonzero().squeeze(1)
    return rows, labels[rows] - c0


def target_cos(x, w, labels, rx, rw, ignore_index):
    """``(valid, safe labels, raw target cosine)``: a gathered dot product per row, O(B*D)."""
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    raw = (x.to(rx.dtype) * w[safe].to(rx.dtype)).sum(1) * rx * rw[safe]
    return valid, safe, raw


def chunk_logits(xs, w, rw, labels, c0, c1, s, tau):
    """One chunk of centers against every row: ``(z, mx, keep, rows, cols)``.

    ``xs = s * n(x)``. ``z: (B, n)`` is ``s*c`` clamped to ``[-s, s]`` and filtered (insightface's
    ``tau``), with the targets at ``-inf``; ``mx`` bounds each row's non-target ``z`` from above (the row
    max, or within ``s`` of it); ``keep`` marks the entries that pass a gradient, None when all non-targets
    do. The clamp and its mask cost a pass only when rounding put some ``|c|`` past 1."""
    z = torch.mm(xs, w[c0:c1].to(xs.dtype).T).mul_(rw[None, c0:c1])
    rows, cols = target_mask(labels, c0, c1)
    z[rows, cols] = -s  # in range, and no larger than any clamped non-target: neutral for the checks below
    lo, mx = torch.aminmax(z, dim=1)
    keep = None
    if float(lo.min()) < -s or float(mx.max()) > s:  # the clamp passes no gradient outside [-1, 1]
        keep = (z >= -s) & (z <= s)
        z.clamp_(-s, s)
    if tau is not None:  # non-target cosines above tau count as 0, with no gradient
        high = z > s * tau
        keep = ~high if keep is None else keep & ~high
        z.masked_fill_(high, 0.0)
        mx = z.amax(1)
    z[rows, cols] = -math.inf
    return z, mx, keep, rows, cols


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
    tau: float | None,
    lse: torch.Tensor | None = None,
    nontarget: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None,
    logit_sets: int = 1,
) -> torch.Tensor:
    """``dL/dW`` (C, D) in the centers' dtype, written once per chunk of centers.

    ``xs = s * n(x)``. The non-target ``E = dL/dc / (gr s)`` of a chunk is ``exp(z - lse)`` (the margin CE:
    pass ``lse``), or ``nontarget(z, c0, c1)`` from the chunk's logits ``z`` (margin KD); the target entry
    is ``coef``. Then ``dW^ = G^T n(x)`` and the normalisation backward through
    ``<n(w_j), dW^_j> = sum_i G_ij c_ij``. ``logit_sets``: how many ``(B, n)`` logit chunks ``nontarget``
    holds at once (chunks shrink to match)."""
    cd = xs.dtype
    xg = xs * gr[:, None]  # G = E * gr s, so G^T n(x) = E^T xg
    t_e = torch.where(gr != 0, coef / (gr * s), torch.zeros_like(coef))  # the target's E entry
    dw = torch.empty_like(w)
    fused = nontarget is None and fused_epilogue(xs)
    for c0, c1 in chunks(logit_sets * xs.shape[0], w.shape[0]):
        if fused:  # one C++ sweep per row: E * rw in place of the logits, and the per-class dot
            e = torch.mm(xs, w[c0:c1].to(cd).T)
            dot = torch.empty(c1 - c0, dtype=cd, device=w.device)
            tgt = chunk_targets(labels, c0, c1)  # bound to a name: a temporary would be freed before the call
            cpu_ext.center_grad_rows(cd == torch.float64, e.data_ptr(), rw[c0:c1].data_ptr(), tgt.data_ptr(),
                                     e.shape[0], c1 - c0, float(s),
                                     float(s * tau) if tau is not None else 0.0, tau is not None, lse.data_ptr(),
                                     gr.data_ptr(), t_e.data_ptr(), raw_t.data_ptr(), dot.data_ptr(),
                                     torch.get_num_threads())  # fmt: skip
        else:
            z, _, keep, rows, cols = chunk_logits(xs, w, rw, labels, c0, c1, s, tau)
            e = torch.sub(z, lse[:, None]).exp_() if nontarget is None else nontarget(z, c0, c1)
            if keep is not None:
                e.masked_fill_(~keep, 0.0)
            e[rows, cols] = t_e[rows]
            z[rows, cols] = s * raw_t[rows]  # sum_i G_ij c_ij = sum_i gr_i E_ij z_ij
            dot = torch.mv(z.mul_(e).T, gr)
            e.mul_(rw[None, c0:c1])
        out = dw[c0:c1] if dw.dtype == cd else torch.empty(c1 - c0, w.shape[1], dtype=cd, device=w.device)
        torch.mul(w[c0:c1].to(cd), -projection(rw[c0:c1], dot)[:, None], out=out)
        out.addmm_(e.T, xg)
        if out.data_ptr() != dw[c0:c1].data_ptr():
            dw[c0:c1] = out
    return dw
