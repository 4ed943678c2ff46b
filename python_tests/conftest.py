"""Shared test setup: Triton interpreter on CPU-only machines, the tolerance table, helpers.

TRITON_INTERPRET must be set before any Triton kernel is decorated, i.e. before mdkernels is imported.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import mdkernels  # noqa: E402,F401
from mdkernels.ops import margin_ce as _mce  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
TRITON_RUNS = _mce.HAS_TRITON and (HAS_CUDA or _mce.interpreting())

# One tolerance table for the whole suite: (rtol, atol) of a fused result against the reference
# computed in the same dtype. Half precisions use the 2x-of-plain-PyTorch rule instead (see
# assert_close_to_truth).
TOL = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (2e-5, 2e-5),
}

# Devices and backends every fused test runs on: CPU torch always; Triton where it can run (GPU, or
# the interpreter); fp64 only on CPU.
FUSED_BACKENDS = ["torch"] + (["triton"] if TRITON_RUNS else [])


def device_for(backend: str) -> str:
    return "cuda" if (backend == "triton" and HAS_CUDA) else "cpu"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    rtol, atol = TOL[dtype]
    scale = expected.abs().max().clamp_min(1.0)  # gradients of a mean loss are tiny: compare to the largest
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=rtol, atol=atol * float(scale), msg=lambda m: f"{what}: {m}"
    )


def assert_close_to_truth(
    fast: torch.Tensor, plain: torch.Tensor, truth: torch.Tensor, what: str = "", floor: float = 1e-6
) -> None:
    """flash-attention's rule: the fused error against the fp64 truth is at most 2x plain PyTorch's
    error in the same dtype (plus a tiny floor for results plain PyTorch gets exactly)."""
    err_fast = (fast.double() - truth.double()).abs().max().item()
    err_plain = (plain.double() - truth.double()).abs().max().item()
    bound = 2 * err_plain + floor * max(1.0, truth.abs().max().item())
    assert err_fast <= bound, f"{what}: fused error {err_fast:.3g} > 2 x plain error {err_plain:.3g} (+floor)"


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
