"""MarginDistillation (arXiv 2003.02586), fused, against mdkernels.reference: values, gradients, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import FUSED_BACKENDS, check_all, check_gpu_half_precision, device_for, grads, make, teacher_of

import mdkernels
from mdkernels import reference as R
from mdkernels.ops.margin_ce import op as margin_ce_op

SHAPES = [(1, 500, 1017), (37, 500, 1017)]
DTYPES = [torch.float64, torch.float32]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["embeddings", "cos", "fixed_dmax"])
def test_margin_distillation(backend, dtype, shape, mode, monkeypatch):
    x, w, y = make(*shape, dtype, device_for(backend))
    t = teacher_of(x, w, y)
    kw = dict(teacher_embeddings=t) if mode == "embeddings" else dict(teacher_cos=R.teacher_target_cosine(t, w, y))
    if mode == "fixed_dmax":
        kw["dmax"] = 1.3
    ref = grads(R.margin_distillation_loss(x, w, y, **kw), x)
    seen = []
    real = margin_ce_op.backward_impl
    monkeypatch.setattr(
        margin_ce_op, "backward_impl", lambda *a: seen.append(a[-3]) or real(*a)
    )  # need_dw (third to last)
    out = grads(mdkernels.margin_distillation_loss(x, w, y, backend=backend, **kw), x)
    check_all(out, ref, dtype, f"margin distillation {mode}")
    assert seen == [False]  # the teacher centers are frozen: no dW GEMM


def test_margin_distillation_module_and_bad_input():
    x, w, y = make(9, 64, 300, torch.float64)
    t = teacher_of(x, w, y)
    mod = mdkernels.nn.MarginDistillation(w, backend="torch").double()
    assert "teacher_centers" in mod.state_dict() and not list(mod.parameters())
    assert mod(x, y, teacher_embeddings=t).item() == pytest.approx(
        R.margin_distillation_loss(x, w, y, teacher_embeddings=t).item(), rel=1e-10
    )
    with pytest.raises(ValueError, match="Dmax"):
        mdkernels.margin_distillation_loss(x, w, y, teacher_cos=-torch.rand(9, dtype=torch.float64))
    with pytest.raises(ValueError, match="exactly one"):
        mdkernels.margin_distillation_loss(x, w, y)
    with pytest.raises(ValueError, match="teacher_embeddings must have 9 rows"):
        mdkernels.margin_distillation_loss(x, w, y, teacher_embeddings=t[:4])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 1e-2)])
def test_gpu_half_precision(backend, dtype, tol, gpu):
    """MarginDistillation in bf16/fp16 on the GPU against the fp64 reference."""
    check_gpu_half_precision(
        lambda m, x, w, y, **kw: m.margin_distillation_loss(
            x, w, y, teacher_embeddings=teacher_of(x, w, y).to(x.dtype), **kw
        ),
        backend,
        dtype,
        tol, device=gpu)
