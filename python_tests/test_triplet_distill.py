"""Triplet distillation (Feng et al.), fused, against mdkernels.reference: every mining, no B^3 memory."""

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
    teacher_of,
)

import mdkernels
from mdkernels import reference as R

DTYPES = [torch.float64, torch.float32]


def triplet_data(B, D, dtype, dev, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, D, generator=g, dtype=torch.float64).to(dev, dtype).requires_grad_()
    t = torch.randn(B, D, generator=g, dtype=torch.float64).to(dev, dtype)
    y = torch.randint(0, classes, (B,), generator=g).to(dev)
    if B > 3:
        y[3] = -1
    return s, t, y


@pytest.mark.slow
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_triplet_all_with_large_and_singleton_classes(backend):
    """Classes larger than a tile of positives (the Triton path walks each anchor's sorted range of
    positives in tiles), a class of one (no positives), ignored rows, labels in no particular order."""
    s, t, _ = triplet_data(150, 64, torch.float64, device_for(backend))
    g = torch.Generator().manual_seed(3)
    y = torch.cat([torch.zeros(80, dtype=torch.long), torch.ones(60, dtype=torch.long), torch.tensor([7]),
                   torch.full((9,), -1)])[torch.randperm(150, generator=g)].to(s.device)  # fmt: skip
    kw = dict(labels=y, m_min=0.1, m_max=0.6)
    ref = grads(R.triplet_distillation_loss(s, t, **kw), s)
    out = grads(mdkernels.triplet_distillation_loss(s, t, backend=backend, **kw), s)
    for a, b in zip(out, ref, strict=True):
        assert_close(a, b, torch.float64, "triplet all, large classes")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mining", ["all", "hard", "semihard"])
@pytest.mark.parametrize("distance", ["l2", "angle"])
def test_triplet_distillation_mined(backend, dtype, mining, distance):
    s, t, y = triplet_data(37, 500, dtype, device_for(backend))
    kw = dict(labels=y, mining=mining, distance=distance, m_min=0.1, m_max=0.6)
    ref = grads(R.triplet_distillation_loss(s, t, **kw), s)
    out = grads(mdkernels.triplet_distillation_loss(s, t, backend=backend, **kw), s)
    assert ref[0].item() > 0
    check_all(out, ref, dtype, f"triplet {mining} {distance}")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_triplet_explicit_and_degenerate(backend):
    s, t, y = triplet_data(12, 16, torch.float64, device_for(backend))
    trip = torch.tensor([[0, 1, 2], [4, 5, 6], [7, 8, 0]], device=s.device)
    ref = grads(R.triplet_distillation_loss(s, t, trip), s)
    out = grads(mdkernels.triplet_distillation_loss(s, t, trip, backend=backend), s)
    check_all(out, ref, torch.float64, "explicit triplets")
    for labels in (torch.arange(12), torch.zeros(12, dtype=torch.long), torch.full((12,), -1)):
        loss = mdkernels.triplet_distillation_loss(s, t, labels=labels.to(s.device), backend=backend)
        (g,) = torch.autograd.grad(loss, s)
        assert loss.item() == 0.0 and torch.all(g == 0)  # no valid triplet: 0, not NaN
    with pytest.raises(ValueError, match=r"triplets must index rows in \[0, 12\)"):
        mdkernels.triplet_distillation_loss(s, t, torch.tensor([[0, 1, 12]]), backend=backend)
    with pytest.raises(ValueError, match="must both be"):
        mdkernels.triplet_distillation_loss(s, t[:, :5], labels=y, backend=backend)
    with pytest.raises(ValueError, match="pass triplets"):
        mdkernels.triplet_distillation_loss(s, t, backend=backend)


@pytest.mark.slow
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_triplet_all_allocates_no_cube(backend):
    B = 512 if backend == "torch" else 96
    s, t, y = triplet_data(B, 8, torch.float32, device_for(backend), classes=B // 8)
    with LargestAllocation() as mode:
        loss = mdkernels.triplet_distillation_loss(s, t, labels=y, backend=backend)
        loss.backward()
    assert loss.item() > 0
    assert mode.largest <= max(1 << 22, 4 * B * B), f"largest allocation {mode.largest}, B^3 = {B**3}"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 1e-2)])
def test_gpu_half_precision(backend, dtype, tol, gpu):
    """Triplet distillation in bf16/fp16 on the GPU against the fp64 reference."""
    check_gpu_half_precision(
        lambda m, x, w, y, **kw: m.triplet_distillation_loss(x, teacher_of(x, w, y).to(x.dtype), labels=y % 13, **kw),
        backend,
        dtype,
        tol, device=gpu)


def test_cuda_backend_has_no_kernel_an_error_not_a_fallback():
    s, t, y = torch.randn(8, 16), torch.randn(8, 16), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError, match="no kernel for triplet_distillation_loss"):
        mdkernels.triplet_distillation_loss(s, t, labels=y, backend="cuda")
