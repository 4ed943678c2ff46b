"""Fused margin-softmax cross-entropy (docs/math.md §1) without a ``B x C`` tensor: the custom ops and autograd.

Design (flash attention with ``K = V = n(W)``). With ``c_ij = <n(x_i), n(w_j)>`` and the margin on the
target only:

* The target cosine is a gathered dot product (O(B*D)); the target logit and its derivative are computed
  on ``(B,)`` vectors (:mod:`mdkernels.ops._common.margin`, or the CUDA row kernel).
* Forward streams over class tiles: the non-target logits ``s*c`` feed an online max and sum-exp per row
  and, when the embeddings need a gradient, the accumulator ``sum_j p_ij (dz/dc)_ij n(w_j)``, rescaled
  whenever the max grows. That accumulator is the non-target part of ``dL/dn(x_i)`` up to the row's
  upstream gradient, so it is saved (``o_bar``, B x D in fp32) and the backward runs no GEMM for ``dx``.
  Classes are split over programs (split-C); the ``(m, l, O)`` partials merge as in flash-decoding.
* Backward, for trainable centers only: each program owns a class tile, loops over the rows, recomputes
  the logits with the saved logsumexp, folds the target term into ``G = dL/dc``, accumulates ``G^T n(x)``
  and finishes the normalisation backward of its rows through ``<n(w_j), dW^_j> = sum_i G_ij c_ij``. The
  gradient is written once, in the centers' dtype: no atomics, no fp32 ``C x D`` scratch.

GEMM work per step, in products of ``B x C x D``: a floor of 4 with trainable centers (2 forward, 2 backward), 2
with frozen ones, 1 for a forward without gradient; more where D is split over the grid (each column block
rebuilds the cosines). The count per dtype, D and GPU is one table, docs/design.md's (``tiles.gemm_units``).

The modern margin family needs, beside per-row margins: a per-row ``m3``; an ``m2`` that carries a gradient
(MagFace's ``m(|x|)``: ``dL/dm2`` comes from the ``(B,)`` statistics, no pass over the classes); a clip of
the target angle and a tighter clamp of every cosine (AdaFace); the easy margin (MagFace); CurricularFace's
modulation of the hard non-target cosines, inside the class loop; and K sub-centers per class, the max taken
inside the tile (:class:`mdkernels.ops._common.margin.NonTarget`). Backends: ``triton_backend``, ``cuda_backend`` and ``torch_backend`` share one contract:
``forward(x, w, labels, rx, rw, s, tau, need_o) -> (lse_nt, o)`` and
``center_grad(x, w, labels, rx, rw, lse, gr, coef, raw_t, s, tau) -> dW``. One ``torch.library`` op pair
runs all of them, so ``torch.compile(fullgraph=True)`` traces through any.
"""

from __future__ import annotations

import torch

from mdkernels._math import compute_dtype
from mdkernels._validate import label_mask
from mdkernels.ops._common import center_update, probe
from mdkernels.ops._common.env import ieee_fp32_matmul, no_autocast, operand_dtype
from mdkernels.ops._common.epilogue import embedding_grad
from mdkernels.ops._common.margin import NonTarget, curricular_threshold, margin_target_and_slope
from mdkernels.ops.l2norm import row_rnorm
from mdkernels.ops.margin_ce import cuda_backend, torch_backend, triton_backend

BACKENDS = {"triton": triton_backend, "cuda": cuda_backend, "torch": torch_backend}


def target_cosine(x, w, labels_k, rx, rw, K):
    """``(raw_t, kt)``: every row's raw cosine to its own class (the max over its K sub-centers) and that
    sub-center (int64); rows with ``labels_k < 0`` get 0. A gathered dot product, O(B*K*D)."""
    safe = labels_k.clamp_min(0)
    cd = rx.dtype
    rows = safe[:, None] * K + torch.arange(K, device=x.device)  # (B, K) weight rows of each target class
    # an elementwise product and a sum, not a batched GEMM: fp32 here never goes through TF32 (docs/design.md,
    # "Precision"), whatever torch's flags say
    dots = (w[rows].to(cd) * x.to(cd)[:, None, :]).sum(2) * rw[rows] * rx[:, None]
    raw_t, kt = dots.max(1)
    valid = labels_k >= 0
    return torch.where(valid, raw_t, torch.zeros_like(raw_t)), torch.where(valid, kt, torch.zeros_like(kt))


def _target_terms(x, w, labels_k, rx, rw, m2, m3, s, m1, fallback, grad, easy, theta_clip, cos_clamp, K, backend,
                  need_dm2=False):  # fmt: skip
    """``(raw_t, kt, z_t, slope, dz_t/dm2)`` of every row (``labels_k < 0``: ignored). ``backend="cuda"`` runs
    the CUDA row kernel (gather, dot and margin in one launch) for the options it has (per-row m2 and m3, no
    clip, no easy margin, a clamp at 1, K = 1, no gradient to m2); every other case computes these O(B*D)
    terms in torch, as the Triton and torch backends always do."""
    cuda_row = backend == "cuda" and K == 1 and not (easy or need_dm2) and theta_clip is None and cos_clamp == 1.0
    if cuda_row and m3.numel():
        raw_t, z_t, slope = cuda_backend.target_terms(x, w, labels_k, rx, rw, m2, m3, s, m1, fallback, grad)
        return raw_t, torch.zeros_like(labels_k), z_t, slope, None
    raw_t, kt = target_cosine(x, w, labels_k, rx, rw, K)
    z_t, slope, dm2 = margin_target_and_slope(raw_t.clamp(-cos_clamp, cos_clamp), m2.to(rx.dtype), s=s, m1=m1,
                                              m3=m3.to(rx.dtype), fallback=fallback, grad=grad, easy_margin=easy,
                                              theta_clip=theta_clip)  # fmt: skip
    return raw_t, kt, z_t, slope, dm2


def _nontarget(tau, cos_clamp, t, raw_t, m2, m3, m1, K, kt):
    """The kernels' non-target options; CurricularFace's threshold from the (unclamped-margin) target."""
    phi = None
    if t is not None:
        phi = curricular_threshold(raw_t.clamp(-cos_clamp, cos_clamp), m2.to(raw_t.dtype), m1=m1,
                                   m3=m3.to(raw_t.dtype))  # fmt: skip
        t = t.detach().to(raw_t.dtype).reshape(())
    return NonTarget(tau=tau, cos_clamp=cos_clamp, t=t, phi=phi, K=K, kt=kt if K > 1 else None)


def target_coefficient(gr, z_t, lse, raw_t, slope, cos_clamp=1.0):
    """The target's ``dL/dc_t = gr (p_t - 1) dz_t/dc_t`` per row, zero where the clamp of ``c_t`` was active."""
    return gr * (torch.exp(z_t - lse) - 1.0) * slope * ((raw_t >= -cos_clamp) & (raw_t <= cos_clamp))


def forward_impl(
    x: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    m2: torch.Tensor,
    m3: torch.Tensor,
    curricular_t: torch.Tensor | None,
    s: float,
    m1: float,
    fallback: bool,
    grad: str,
    easy_margin: bool,
    theta_clip: float | None,
    cos_clamp: float,
    interclass_filter: float | None,
    subcenters: int,
    ignore_index: int,
    need_dx: bool,
    backend: str,
    op_dtype: str = "",
) -> tuple[torch.Tensor, ...]:
    """Returns ``(loss_rows, lse, cos_target, rx, rw, o_bar, kt)``: per-row loss (0 for ignored rows), full
    logsumexp, clamped target cosine, the inverse norms of the rows of x and w, (``need_dx``)
    ``o_bar_i = sum_{j != y_i} p_ij (dz/dc)_ij n(w_j)`` ``(B, D)`` (else ``(0, D)``), and the target's
    sub-center ``(B,)``. ``m2``, ``m3``: ``(B,)``. ``grad`` only selects the backward's target derivative.
    ``op_dtype``: the dots' operand dtype under autocast ("bfloat16", "float16"), "" for the inputs' own. x and
    w are read with their strides (no copy of the centers)."""
    K = int(subcenters)  # the plan (mdkernels._plan) chose and checked the backend: it is not asked again here
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)} (a plan's choice), got {backend!r}")
    if K < 1 or w.shape[0] % K:
        raise ValueError(f"subcenters={K} must be >= 1 and divide the centers' rows ({w.shape[0]})")
    with no_autocast(x):
        return _forward(x, w, labels, m2, m3, curricular_t, s, m1, fallback, easy_margin, theta_clip, cos_clamp,
                        interclass_filter, K, ignore_index, need_dx, backend, operand_dtype(op_dtype))  # fmt: skip


def _forward(x, w, labels, m2, m3, curricular_t, s, m1, fallback, easy_margin, theta_clip, cos_clamp,
             interclass_filter, K, ignore_index, need_dx, backend, op_dtype):  # fmt: skip
    labels = labels.long()
    valid = label_mask(labels, w.shape[0] // K, ignore_index)  # out-of-range labels: an error, the row ignored
    rx, rw = row_rnorm(x, use_cuda=backend == "cuda"), row_rnorm(w, use_cuda=backend == "cuda")
    labels_k = torch.where(valid, labels, torch.full_like(labels, -1))
    raw_t, kt, z_t, _, _ = _target_terms(x, w, labels_k, rx, rw, m2, m3, s, m1, fallback, "straight_through",
                                         easy_margin, theta_clip, cos_clamp, K, backend)  # fmt: skip
    cos_t = raw_t.clamp(-cos_clamp, cos_clamp)
    nt = _nontarget(interclass_filter, cos_clamp, curricular_t, raw_t, m2, m3, m1, K, kt)
    lse_nt, o = BACKENDS[backend].forward(x, w, labels_k, rx, rw, s, nt, need_dx, op_dtype=op_dtype)
    lse = torch.where(valid, torch.logaddexp(lse_nt, z_t), lse_nt)  # ignored rows: lse over all classes
    loss_rows = torch.where(valid, lse - z_t, torch.zeros_like(lse))
    if need_dx:  # the non-target share of the softmax mass turns o (normalised over non-targets) into o_bar
        o_bar = o * torch.exp(lse_nt - lse).nan_to_num_(0.0)[:, None]
    else:
        o_bar = x.new_empty(0, x.shape[1], dtype=rx.dtype)
    return loss_rows, lse, cos_t, rx, rw, o_bar, kt


@torch.library.custom_op("mdkernels::margin_ce_forward", mutates_args=())
def margin_ce_forward(
    x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, m2: torch.Tensor, m3: torch.Tensor,
    curricular_t: torch.Tensor | None, s: float, m1: float, fallback: bool, grad: str, easy_margin: bool,
    theta_clip: float | None, cos_clamp: float, interclass_filter: float | None, subcenters: int, ignore_index: int,
    need_dx: bool, backend: str, op_dtype: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The fused forward as a torch.library op (see :func:`forward_impl`)."""
    with probe.inside(), ieee_fp32_matmul(x):
        return forward_impl(x, w, labels, m2, m3, curricular_t, s, m1, fallback, grad, easy_margin, theta_clip,
                            cos_clamp, interclass_filter, subcenters, ignore_index, need_dx, backend,
                            op_dtype)  # fmt: skip


@margin_ce_forward.register_fake
def _(x, w, labels, m2, m3, curricular_t, s, m1, fallback, grad, easy_margin, theta_clip, cos_clamp,
      interclass_filter, subcenters, ignore_index, need_dx, backend, op_dtype):  # fmt: skip
    cd = compute_dtype(x)
    row = x.new_empty(x.shape[0], dtype=cd)
    o_bar = x.new_empty(x.shape[0] if need_dx else 0, x.shape[1], dtype=cd)
    kt = x.new_empty(x.shape[0], dtype=torch.int64)
    return row, torch.empty_like(row), torch.empty_like(row), torch.empty_like(row), x.new_empty(w.shape[0], dtype=cd), o_bar, kt


def backward_impl(
    grad_rows: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    labels: torch.Tensor,
    m2: torch.Tensor,
    m3: torch.Tensor,
    curricular_t: torch.Tensor | None,
    lse: torch.Tensor,
    rx: torch.Tensor,
    rw: torch.Tensor,
    o_bar: torch.Tensor,
    kt: torch.Tensor,
    s: float,
    m1: float,
    fallback: bool,
    grad: str,
    easy_margin: bool,
    theta_clip: float | None,
    cos_clamp: float,
    interclass_filter: float | None,
    subcenters: int,
    ignore_index: int,
    need_dx: bool,
    need_dw: bool,
    need_dm2: bool,
    backend: str,
    op_dtype: str = "",
    step: center_update.Step | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(dx, dw, dm2)``, each empty (0 elements) when not needed. ``dx`` needs no GEMM (``o_bar``);
    ``dw`` is the only pass over the classes, and there is none for frozen centers; ``dm2 = dL/dm2`` ``(B,)``
    comes from the per-row statistics alone. Gradients come back in the dtype and layout of x and w. With
    ``step`` (the fused center update) the centers' gradient is applied to ``w`` tile by tile, after ``dx``
    (which reads the old centers), and ``dw`` comes back empty."""
    if need_dx and o_bar.shape[0] != x.shape[0]:
        raise ValueError("margin_ce_backward: dx needs the forward's o_bar; call the forward with need_dx=True")
    with no_autocast(x):
        return _backward_impl(grad_rows, x, w, labels, m2, m3, curricular_t, lse, rx, rw, o_bar, kt, s, m1, fallback,
                              grad, easy_margin, theta_clip, cos_clamp, interclass_filter, int(subcenters),
                              ignore_index, need_dx, need_dw, need_dm2, backend, operand_dtype(op_dtype),
                              step)  # fmt: skip


def _backward_impl(grad_rows, x, w, labels, m2, m3, curricular_t, lse, rx, rw, o_bar, kt, s, m1, fallback, grad,
                   easy_margin, theta_clip, cos_clamp, interclass_filter, K, ignore_index, need_dx, need_dw, need_dm2,
                   backend, op_dtype, step=None):  # fmt: skip
    labels = labels.long()
    cd = rx.dtype
    valid = (labels != ignore_index) & (labels >= 0) & (labels < w.shape[0] // K)  # as the forward counted them
    gr = torch.where(valid, grad_rows.to(cd), torch.zeros_like(lse))
    labels_k = torch.where(valid, labels, torch.full_like(labels, -1))
    raw_t, _, z_t, slope, dz_dm2 = _target_terms(x, w, labels_k, rx, rw, m2, m3, s, m1, fallback, grad, easy_margin,
                                                 theta_clip, cos_clamp, K, backend, need_dm2)  # fmt: skip
    coef = target_coefficient(gr, z_t, lse, raw_t, slope, cos_clamp)
    dx = dw = dm2 = None
    if need_dx:
        rows = labels_k.clamp_min(0) * K + kt  # the target's sub-center row
        dx = embedding_grad(x, w, o_bar, gr, coef, torch.where(valid, rows, torch.full_like(rows, -1)), rw,
                            use_cuda=backend == "cuda")  # fmt: skip
    if need_dw:
        nt = _nontarget(interclass_filter, cos_clamp, curricular_t, raw_t, m2, m3, m1, K, kt)
        if step is None:
            dw = BACKENDS[backend].center_grad(x, w, labels_k, rx, rw, lse, gr, coef, raw_t, s, nt, op_dtype=op_dtype)
        else:  # every read of the old centers (the target terms, dx) is done: update them tile by tile
            BACKENDS[backend].center_grad(x, w, labels_k, rx, rw, lse, gr, coef, raw_t, s, nt, op_dtype=op_dtype,
                                          step=step)  # fmt: skip
    if need_dm2:  # dL/dm2 = gr (p_t - 1) dz_t/dm2, per row: no pass over the classes
        if dz_dm2 is None:
            raise ValueError("margin_ce_backward: dm2 needs the torch target terms")
        dm2 = gr * (torch.exp(z_t - lse) - 1.0) * dz_dm2
    return ((dx if dx is not None else x.new_empty(0)), (dw if dw is not None else w.new_empty(0)),
            (dm2.to(m2.dtype) if dm2 is not None else x.new_empty(0)))  # fmt: skip


@torch.library.custom_op("mdkernels::margin_ce_backward", mutates_args=())
def margin_ce_backward(
    grad_rows: torch.Tensor, x: torch.Tensor, w: torch.Tensor, labels: torch.Tensor, m2: torch.Tensor,
    m3: torch.Tensor, curricular_t: torch.Tensor | None, lse: torch.Tensor, rx: torch.Tensor, rw: torch.Tensor,
    o_bar: torch.Tensor, kt: torch.Tensor, s: float, m1: float, fallback: bool, grad: str, easy_margin: bool,
    theta_clip: float | None, cos_clamp: float, interclass_filter: float | None, subcenters: int, ignore_index: int,
    need_dx: bool, need_dw: bool, need_dm2: bool, backend: str, op_dtype: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The fused backward as a torch.library op (see :func:`backward_impl`)."""
    with probe.inside(), ieee_fp32_matmul(x):
        return backward_impl(grad_rows, x, w, labels, m2, m3, curricular_t, lse, rx, rw, o_bar, kt, s, m1, fallback,
                             grad, easy_margin, theta_clip, cos_clamp, interclass_filter, subcenters, ignore_index,
                             need_dx, need_dw, need_dm2, backend, op_dtype)  # fmt: skip


@margin_ce_backward.register_fake
def _(grad_rows, x, w, labels, m2, m3, curricular_t, lse, rx, rw, o_bar, kt, s, m1, fallback, grad, easy_margin,
      theta_clip, cos_clamp, interclass_filter, subcenters, ignore_index, need_dx, need_dw, need_dm2, backend,
      op_dtype):  # fmt: skip
    return ((torch.empty_like(x) if need_dx else x.new_empty(0)), (torch.empty_like(w) if need_dw else w.new_empty(0)),
            (torch.empty_like(m2) if need_dm2 else x.new_empty(0)))  # fmt: skip


def _setup_context(ctx, inputs, output):
    x, w, labels, m2, m3, curricular_t, *args = inputs
    _, lse, _, rx, rw, o_bar, kt = output
    ctx.save_for_backward(x, w, labels, m2, m3, curricular_t, lse, rx, rw, o_bar, kt)
    ctx.args = tuple(args[:-3])  # s .. ignore_index
    ctx.backend, ctx.op_dtype = args[-2], args[-1]
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_rows, *_unused):
    x, w, labels, m2, m3, curricular_t, lse, rx, rw, o_bar, kt = ctx.saved_tensors
    need_dx, need_dw, need_dm2 = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
    if not (need_dx or need_dw or need_dm2):
        return (None,) * 19
    step = center_update.claim(w) if need_dw else None
    if step is not None:  # the fused center update: w changes in place, its gradient is never formed (None)
        with probe.inside(), ieee_fp32_matmul(x), torch.no_grad():
            dx, _, dm2 = backward_impl(grad_rows, x, w, labels, m2, m3, curricular_t, lse, rx, rw, o_bar, kt,
                                       *ctx.args, need_dx, True, need_dm2, ctx.backend, ctx.op_dtype,
                                       step)  # fmt: skip
        return (dx if need_dx else None), None, None, (dm2 if need_dm2 else None), *(None,) * 15
    dx, dw, dm2 = margin_ce_backward(grad_rows, x, w, labels, m2, m3, curricular_t, lse, rx, rw, o_bar, kt, *ctx.args,
                                     need_dx, need_dw, need_dm2, ctx.backend, ctx.op_dtype)  # fmt: skip
    return (dx if need_dx else None), (dw if need_dw else None), None, (dm2 if need_dm2 else None), *(None,) * 15


torch.library.register_autograd("mdkernels::margin_ce_forward", _backward, setup_context=_setup_context)
