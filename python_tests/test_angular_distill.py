"""Angular distillation (ShrinkTeaNet), fused, against mdkernels.reference: Triton, torch and CUDA C++."""

from __future__ import annotations

import pytest
import torch
from conftest import FUSED_BACKENDS, check_all, check_gpu_half_precision, device_for, grads, teacher_of

import mdkernels
from mdkernels import reference as R

DTYPES = [torch.float64, torch.float32]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("shape,per", [((1, 500), "sample"), ((37, 500), "sample"), ((3, 5, 4, 7), "sample"),
                                       ((3, 5, 4, 7), "position")])  # fmt: skip
def test_angular_distillation(backend, dtype, p, shape, per):
    g = torch.Generator().manual_seed(0)
    dev = device_for(backend)
    s = torch.randn(*shape, generator=g, dtype=torch.float64).to(dev, dtype).requires_grad_()
    t = torch.randn(*shape, generator=g, dtype=torch.float64).to(dev, dtype)
    ref = grads(R.angular_distillation_loss(s, t, p=p, per=per), s)
    out = grads(mdkernels.angular_distillation_loss(s, t, p=p, per=per, backend=backend), s)
    check_all(out, ref, dtype, f"angular p={p} {per}")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_angular_gradcheck_and_identical_inputs(backend):
    dev = device_for(backend)
    g = torch.Generator().manual_seed(3)
    s = torch.randn(4, 6, generator=g, dtype=torch.float64).to(dev).requires_grad_()
    t = torch.randn(4, 6, generator=g, dtype=torch.float64).to(dev)
    for p in (1.0, 2.0, 3.0):
        fn = lambda s, p=p: mdkernels.angular_distillation_loss(s, t, p=p, backend=backend)
        assert torch.autograd.gradcheck(fn, (s,))
    same = mdkernels.angular_distillation_loss(s, s.detach() * 2, backend=backend)
    (g,) = torch.autograd.grad(same, s)
    assert abs(same.item()) < 1e-12 and torch.isfinite(g).all()


def test_angular_module_adapters_and_bad_input():
    torch.manual_seed(0)
    mod = mdkernels.nn.AngularDistillation(channels=[(8, 16), (32, 32)], weights=[1.0, 7.0], backend="torch")
    fs = [torch.randn(2, 8, 5, 5, requires_grad=True), torch.randn(2, 32, requires_grad=True)]
    ft = [torch.randn(2, 16, 5, 5), torch.randn(2, 32)]
    loss = mod(fs, ft)
    loss.backward()
    expect = R.angular_distillation_loss(mod.adapters[0](fs[0]), ft[0]) + 7.0 * R.angular_distillation_loss(
        fs[1], ft[1]
    )
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)
    assert mod.adapters[0].weight.grad is not None and fs[0].grad is not None
    with pytest.raises(ValueError, match="same shape"):
        mdkernels.angular_distillation_loss(torch.randn(2, 8), torch.randn(2, 9))
    with pytest.raises(ValueError, match="p must be >= 1"):
        mdkernels.angular_distillation_loss(torch.randn(2, 8), torch.randn(2, 8), p=0.5)
    with pytest.raises(ValueError, match="per must be"):
        mdkernels.angular_distillation_loss(torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2), per="pixel")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 1e-2)])
def test_gpu_half_precision(backend, dtype, tol, gpu):
    """Angular distillation in bf16/fp16 on the GPU against the fp64 reference."""
    check_gpu_half_precision(
        lambda m, x, w, y, **kw: m.angular_distillation_loss(x, teacher_of(x, w, y).to(x.dtype), **kw),
        backend,
        dtype,
        tol, device=gpu)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,per", [((67, 500), "sample"), ((3, 64, 7, 9), "sample"), ((3, 64, 7, 9), "position")])
def test_cuda_angular_kernels_against_truth(dtype, shape, per, gpu):
    from conftest import assert_close_to_truth, gpu_backends

    if not gpu_backends("cuda"):
        pytest.skip("CUDA module (or, on the CPU, its emulator) not built in this install")
    g = torch.Generator().manual_seed(0)
    s = torch.randn(*shape, generator=g).to(gpu, dtype).requires_grad_()
    t = torch.randn(*shape, generator=g).to(gpu, dtype)
    sd = s.detach().double().requires_grad_()
    truth = grads(R.angular_distillation_loss(sd, t.double(), per=per), sd)
    plain = grads(R.angular_distillation_loss(s, t, per=per), s)
    fast = grads(mdkernels.angular_distillation_loss(s, t, per=per, backend="cuda"), s)
    for f, p_, tr, name in zip(fast, plain, truth, ("loss", "ds"), strict=True):
        assert_close_to_truth(f, p_, tr, f"cuda angular {dtype} {name}")


def test_cuda_backend_is_a_clear_error_without_cuda_tensors():
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA"):
        mdkernels.angular_distillation_loss(torch.randn(2, 8), torch.randn(2, 8), backend="cuda")
