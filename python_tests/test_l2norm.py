"""l2_normalize (CUDA C++ kernel on GPU, torch elsewhere) against F.normalize."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import HAS_CUDA, assert_close_to_truth, gpu_backends

import mdkernels
from mdkernels import _cuda_ext
from mdkernels.ops.l2norm import normalize_backward, row_rnorm


@pytest.mark.parametrize("shape", [(1, 500), (37, 500), (1017, 64)])
def test_matches_f_normalize_fp64(shape):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(*shape, dtype=torch.float64)
    y = mdkernels.l2_normalize(x)
    (gx,) = torch.autograd.grad(y, x, dy)
    ref = F.normalize(x, dim=1)
    (gref,) = torch.autograd.grad(ref, x, dy)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gx, gref, rtol=1e-10, atol=1e-12)


def test_gradcheck_and_zero_row():
    x = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(mdkernels.l2_normalize, (x,))
    z = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    dy = torch.ones(2, 3, dtype=torch.float64)
    (g,) = torch.autograd.grad(mdkernels.l2_normalize(z), z, dy)
    (gref,) = torch.autograd.grad(F.normalize(z, dim=1), z, dy)
    torch.testing.assert_close(g, gref)  # dy / eps, as F.normalize's autograd


def test_helpers_in_place_and_rnorm():
    x = torch.randn(9000, 20, dtype=torch.float64)  # more rows than one torch chunk
    torch.testing.assert_close(row_rnorm(x), 1 / x.norm(dim=1))
    dy = torch.randn_like(x)
    expect = normalize_backward(x, dy.clone())
    out = normalize_backward(x, dy, out=dy)
    assert out.data_ptr() == dy.data_ptr()
    torch.testing.assert_close(out, expect)


def test_opcheck_and_bad_input():
    torch.library.opcheck(torch.ops.mdkernels.l2_normalize, (torch.randn(5, 8), 1e-12))
    with pytest.raises(ValueError, match="2-D"):
        mdkernels.l2_normalize(torch.randn(3))
    with pytest.raises(ValueError, match="floating"):
        mdkernels.l2_normalize(torch.ones(3, 3, dtype=torch.int64))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_kernel_against_truth(dtype, gpu):
    if not gpu_backends("cuda"):
        pytest.skip("CUDA module (or, on the CPU, its emulator) not built in this install")
    assert _cuda_ext.usable(torch.empty(1, device=gpu, dtype=dtype)), "the CUDA kernel is what runs here"
    x = torch.randn(1017, 500, device=gpu, dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)
    y = mdkernels.l2_normalize(x)
    (gx,) = torch.autograd.grad(y, x, dy)
    xd = x.detach().double().requires_grad_()
    truth = F.normalize(xd, dim=1)
    (gtruth,) = torch.autograd.grad(truth, xd, dy.double())
    plain = F.normalize(x, dim=1)
    (gplain,) = torch.autograd.grad(plain, x, dy)
    assert_close_to_truth(y, plain, truth, f"{dtype} y")
    assert_close_to_truth(gx, gplain, gtruth, f"{dtype} dx")
    # fp32 gradient into a half-precision x: the mixed-dtype entry the margin CE backward uses
    out = normalize_backward(x.detach(), dy.float())
    assert out.dtype == dtype
    assert_close_to_truth(out, gplain, gtruth, f"{dtype} dx from fp32 dy")


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only check")
def test_cpu_never_calls_the_cuda_module():
    assert not _cuda_ext.usable(torch.randn(2, 2))


def test_torch_compile_fullgraph_traces_the_op():
    x = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    fn = torch.compile(lambda x: (mdkernels.l2_normalize(x) * 3).sum(), fullgraph=True, backend="aot_eager")
    (g,) = torch.autograd.grad(fn(x), x)
    (gref,) = torch.autograd.grad((F.normalize(x, dim=1) * 3).sum(), x)
    torch.testing.assert_close(g, gref)
