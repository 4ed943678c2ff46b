"""Hinton KD on margin logits, fused, against mdkernels.reference: values, gradients, no B x C memory."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    FUSED_BACKENDS,
    LargestAllocation,
    assert_close,
    check_all,
    check_gpu_half_precision,
    device_for,
    grads,
    make,
    teacher_of,
)

import mdkernels
from mdkernels import reference as R
from mdkernels.ops import margin_kd as mkd

SHAPES = [(1, 500, 1017), (37, 500, 1017)]
DTYPES = [torch.float64, torch.float32]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kw", [dict(), dict(T=1.0, alpha=0.5, m2=0.3), dict(T=2.5, alpha=1.0, s=30.0)],
                         ids=["paper", "T1", "pureKD"])  # fmt: skip
def test_margin_kd(backend, dtype, shape, kw):
    x, w, y = make(*shape, dtype, device_for(backend))
    t = teacher_of(x, w, y, scale=1.0)
    ref = grads(R.margin_kd_loss(x, t, w, y, **kw), x, w)
    out = grads(mdkernels.margin_kd_loss(x, t, w, y, backend=backend, **kw), x, w)
    check_all(out, ref, dtype, f"margin kd {kw}")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_margin_kd_reductions_frozen_centers_and_module(backend):
    x, w, y = make(13, 64, 301, torch.float64, device_for(backend))
    t = teacher_of(x, w, y)
    rows = mdkernels.margin_kd_loss(x, t, w.detach(), y, reduction="none", backend=backend)
    ref = R.margin_kd_loss(x, t, w.detach(), y, reduction="none")
    assert_close(rows.detach(), ref.detach(), torch.float64, "rows")
    assert rows[13 // 2].item() == 0.0  # ignored row
    mod = mdkernels.nn.MarginKD(w, backend=backend)
    loss = mod(x, t, y)
    (gx,) = torch.autograd.grad(loss, x)
    assert_close(gx, torch.autograd.grad(R.margin_kd_loss(x, t, w.detach(), y), x)[0], torch.float64, "module dx")


@pytest.mark.slow
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_margin_kd_allocates_no_batch_by_classes(backend):
    B, D, C = 64, 16, 50_000 if backend == "torch" else 8_000
    dev = device_for(backend)
    x, w, y = (v.detach() for v in make(B, D, C, torch.float32, dev))
    t = teacher_of(x, w, y)
    args = (4.0, 0.95, 64.0, 1.0, 0.5, 0.0, True, -1)
    with LargestAllocation() as mode:
        loss_rows, lse_s, lse_sT, lse_tT, rxs, rxt, rw, o_bar = mkd.forward_impl(x, t, w, y, *args, True, backend)
        mkd.backward_impl(torch.ones_like(loss_rows), x, t, w, y, lse_s, lse_sT, lse_tT, rxs, rxt, rw, o_bar, *args,
                          True, True, backend)  # fmt: skip
    assert 0 < mode.largest <= max(C * D, B * C // 4), f"largest allocation {mode.largest}, B*C = {B * C}"


def test_margin_kd_bad_input_opcheck_and_compile():
    x, w, y = make(6, 40, 50, torch.float32)
    t = teacher_of(x, w, y)
    with pytest.raises(ValueError, match="T .* must be > 0"):
        mdkernels.margin_kd_loss(x, t, w, y, T=0.0)
    with pytest.raises(ValueError, match="alpha must be in"):
        mdkernels.margin_kd_loss(x, t, w, y, alpha=1.5)
    with pytest.raises(ValueError, match="teacher_embeddings must have 40 columns"):
        mdkernels.margin_kd_loss(x, t[:, :20], w, y)
    for need_dx in (True, False):  # without need_dx, the student must not need a gradient
        args = (x if need_dx else x.detach(), t, w, y, 4.0, 0.95, 16.0, 1.0, 0.5, 0.0, True, -1, need_dx, "torch", "")
        torch.library.opcheck(mkd.margin_kd_forward, args)

    def step(x, t, y):
        return mdkernels.margin_kd_loss(x, t, w, y, backend="torch") + mdkernels.angular_distillation_loss(
            x, t, backend="torch"
        )

    eager = step(x, t, y)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, t, y)
    assert compiled.item() == pytest.approx(eager.item(), rel=1e-6)
    for a, b in zip(torch.autograd.grad(compiled, (x, w)), torch.autograd.grad(eager, (x, w)), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)  # the backward through the registered autograd


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 1e-2)])
def test_gpu_half_precision(backend, dtype, tol, gpu):
    """Margin KD in bf16/fp16 on the GPU against the fp64 reference."""
    check_gpu_half_precision(
        lambda m, x, w, y, **kw: m.margin_kd_loss(x, teacher_of(x.detach(), w.detach(), y).to(x.dtype), w, y, **kw),
        backend, dtype, tol, centers_grad=True, device=gpu)  # fmt: skip


def test_cuda_backend_has_no_kernel_an_error_not_a_fallback():
    s, t, y, w = torch.randn(8, 16), torch.randn(8, 16), torch.randint(0, 3, (8,)), torch.randn(10, 16)
    with pytest.raises(ValueError, match="no kernel for margin_kd_loss"):
        mdkernels.margin_kd_loss(s, t, w, y, backend="cuda")


@pytest.mark.slow
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_margin_kd_d1024_split_over_the_grid(backend):
    """D = 1024 is beyond the resident tiles: the Triton kernels split D over the grid."""
    x, w, y = make(5, 1024, 300, torch.float64, device_for(backend))
    t = teacher_of(x, w, y, scale=1.0)
    ref = grads(R.margin_kd_loss(x, t, w, y), x, w)
    out = grads(mdkernels.margin_kd_loss(x, t, w, y, backend=backend), x, w)
    check_all(out, ref, torch.float64, "margin kd D=1024")
