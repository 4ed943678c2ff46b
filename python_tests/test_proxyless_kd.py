"""ProxylessKD (arXiv 2011.00265), fused, against mdkernels.reference."""

from __future__ import annotations

import pytest
import torch
from conftest import FUSED_BACKENDS, check_all, check_gpu_half_precision, device_for, grads, make

import mdkernels
from mdkernels import reference as R


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("margin,m", [("arcface", 0.5), ("cosface", 0.35), ("sphereface", 1.35)])
def test_proxyless_kd(backend, margin, m):
    x, w, y = make(37, 500, 1017, torch.float64, device_for(backend))
    ref = grads(R.proxyless_kd_loss(x, w, y, margin=margin, m=m), x)
    out = grads(mdkernels.proxyless_kd_loss(x, w, y, margin=margin, m=m, backend=backend), x)
    check_all(out, ref, torch.float64, f"proxyless {margin}")


def test_proxyless_module_projection_and_bad_input():
    x, w, y = make(8, 64, 100, torch.float32)
    with pytest.raises(ValueError, match="ProxylessKD trains the student in the teacher's embedding space"):
        mdkernels.proxyless_kd_loss(x[:, :32], w, y)
    mod = mdkernels.nn.ProxylessKD(w, projection=True, embedding_size=32)
    loss = mod(x[:, :32].detach(), y)
    loss.backward()
    assert mod.projection.weight.grad is not None and torch.isfinite(loss)
    with pytest.raises(ValueError, match="margin must be one of"):
        mdkernels.proxyless_kd_loss(x, w, y, margin="adaface")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 1e-2)])
def test_gpu_half_precision(backend, dtype, tol, gpu):
    """ProxylessKD in bf16/fp16 on the GPU against the fp64 reference."""
    check_gpu_half_precision(lambda m, x, w, y, **kw: m.proxyless_kd_loss(x, w, y, **kw), backend, dtype, tol,
                             device=gpu)
