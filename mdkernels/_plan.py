"""The plan of a fused call: every decision it makes before a kernel runs, made once, here, read top to bottom.

A public function of :mod:`mdkernels.functional` asks for the plan of its call and hands it to its op. A plan is
made in this order, each step in a module that calls nothing back:

1. the dots' operand dtype: under ``torch.autocast`` fp32 inputs are multiplied in the region's 16-bit dtype,
   accumulated in fp32; otherwise in the inputs' own dtype;
2. the arguments (:mod:`mdkernels._validate`): shapes, dtypes, devices and options, from metadata only (label
   values are checked by the op, on the device), and the warning for a margin that is not monotone;
3. the numbers the op takes: per-row margins in the compute dtype (:mod:`mdkernels._math`), CurricularFace's ``t``
   as a 0-d tensor;
4. the backend (:func:`mdkernels.backends.resolve`): ``"auto"``'s choice and whether the chosen backend can run
   this call here, the CUDA module asked once.

The ops (:mod:`mdkernels.ops`) execute a plan: they decide nothing of it and check nothing of it again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mdkernels import _validate as V
from mdkernels import backends
from mdkernels._math import compute_dtype, margin_rows
from mdkernels.ops._common import center_update

_AUTOCAST_OPERANDS = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def autocast_operands(t) -> str:
    """The dots' operand dtype for ``t`` under ``torch.autocast``, as the custom ops carry it: "bfloat16" or
    "float16" for fp32 inputs inside an autocast region of their device, else "" (the inputs' own dtype). Read
    here, outside the custom op, whose own body runs with autocast off."""
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.device.type not in ("cuda", "cpu"):
        return ""
    if not torch.is_autocast_enabled(t.device.type):
        return ""
    return _AUTOCAST_OPERANDS.get(torch.get_autocast_dtype(t.device.type), "")


@dataclass(frozen=True)
class MarginCEPlan:
    """What a margin cross-entropy call runs with. ``backend``: "triton", "cuda", "torch" or "reference".
    ``op_dtype``: the dots' operand dtype ("" = the inputs'). ``shape``: ``(B, C, D)``, C in classes.
    ``m2``, ``m3``: ``(B,)`` in the compute dtype (``m3`` detached). ``curricular_t``: 0-d, or None.
    ``need_dx``: whether the forward builds the embeddings' gradient (else it skips a GEMM)."""

    backend: str
    op_dtype: str
    shape: tuple[int, int, int]
    m2: torch.Tensor
    m3: torch.Tensor
    curricular_t: torch.Tensor | None
    need_dx: bool


def margin_ce(embeddings, centers, labels, *, s, m1, m2, m3, fallback, grad, subcenters, curricular_t, easy_margin,
              theta_clip, cos_clamp, reduction, check_finite, backend) -> MarginCEPlan:  # fmt: skip
    """The plan of :func:`mdkernels.margin_cross_entropy` (its arguments, unchanged)."""
    op_dtype = autocast_operands(embeddings)  # fp32 under torch.autocast: 16-bit operands, fp32 accumulation
    # 2. the arguments
    V.check_margin_ce_args(embeddings, centers, labels, s=s, m2=m2, grad=grad, reduction=reduction, m1=m1)
    B, D = embeddings.shape
    V.check_subcenters(subcenters, centers)
    V.check_margin_options(m3=m3, fallback=fallback, easy_margin=easy_margin, theta_clip=theta_clip,
                           cos_clamp=cos_clamp, curricular_t=curricular_t, batch=B,
                           device=embeddings.device)  # fmt: skip
    V.check_centers_not_empty(centers)
    if check_finite:
        V.check_finite(embeddings, "embeddings")
        V.check_finite(centers, "centers")
    if not isinstance(m2, torch.Tensor) and not easy_margin and theta_clip is None:
        V.warn_if_non_monotone(m1, float(m2), fallback)
    # 3. the numbers the op takes, in the compute dtype
    cd = compute_dtype(embeddings)
    m2_rows, m3_rows = margin_rows(m2, embeddings), margin_rows(m3, embeddings).detach()
    t = None
    if isinstance(curricular_t, torch.Tensor):
        t = curricular_t.detach().to(device=embeddings.device, dtype=cd).reshape(())
    elif curricular_t is not None:  # a float: in the compute dtype directly (through fp32 it would lose digits)
        t = torch.full((), float(curricular_t), dtype=cd, device=embeddings.device)  # a fill: no host-to-device copy
    # 4. the backend
    shape = (B, centers.shape[0] // subcenters, D)
    fused_step = torch.is_grad_enabled() and centers.requires_grad and center_update.bound(centers)
    chosen = backends.resolve("margin_ce", backend, embeddings, shape, subcenters=subcenters,
                              curricular_t=curricular_t is not None, autocast=bool(op_dtype),
                              strided_centers=centers.stride(1) != 1, center_update=fused_step)  # fmt: skip
    need_dx = torch.is_grad_enabled() and embeddings.requires_grad
    return MarginCEPlan(chosen, op_dtype, shape, m2_rows, m3_rows, t, need_dx)


@dataclass(frozen=True)
class MarginKDPlan:
    """What a margin KD call runs with (see :class:`MarginCEPlan`)."""

    backend: str
    op_dtype: str
    need_dx: bool


def margin_kd(student_embeddings, teacher_embeddings, centers, labels, *, T, alpha, s, m1, m2, reduction,
              backend) -> MarginKDPlan:  # fmt: skip
    """The plan of :func:`mdkernels.margin_kd_loss` (its arguments, unchanged)."""
    op_dtype = autocast_operands(student_embeddings)
    V.check_matrix(teacher_embeddings, "teacher_embeddings", rows=student_embeddings.shape[0],
                   cols=student_embeddings.shape[1])  # fmt: skip
    V.check_margin_ce_args(student_embeddings, centers, labels, s=s, m1=m1, m2=m2, grad="exact", reduction=reduction,
                           emb_name="student_embeddings")  # fmt: skip
    V.check_same(student_embeddings, teacher_embeddings, "student_embeddings", "teacher_embeddings")
    V.check_kd_options(m2=m2, T=T, alpha=alpha)
    chosen = backends.resolve("margin_kd", backend, student_embeddings, (student_embeddings.shape[0], *centers.shape),
                              autocast=bool(op_dtype))  # fmt: skip
    return MarginKDPlan(chosen, op_dtype, torch.is_grad_enabled() and student_embeddings.requires_grad)
