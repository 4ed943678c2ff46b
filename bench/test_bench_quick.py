"""The quick CPU benchmark set under pytest-benchmark (not part of the test suite; ``pip install ".[test]"`` or
``".[bench]"`` installs pytest-benchmark):

    pytest bench/test_bench_quick.py --benchmark-only

Each timed call is also checked: a margin loss equals the eager reference's, the plain linear CE equals
``F.cross_entropy`` of the logits, the bare GEMMs have their shapes, and a training step leaves finite gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("pytest_benchmark")

from bench import bench_margin_ce as M  # noqa: E402

SHAPE = dict(B=64, D=512, C=20_000)
PROVIDERS = ["mdk_torch", "reference", "insightface_eager", "torch_linear_ce", "gemm_bound"]
MARGIN_LOSSES = ("mdk_torch", "reference", "insightface_eager")  # ArcFace s=64, m=0.5: one value


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_margin_ce_quick(benchmark, provider, mode):
    torch.manual_seed(0)
    x, w, y = M.make_inputs(SHAPE["B"], SHAPE["D"], SHAPE["C"], torch.float32, "cpu")
    fn = M.providers("cpu")[provider]
    call = M.callables(fn, mode, x, w, y)
    benchmark.group = f"margin_ce {mode} B={SHAPE['B']} C={SHAPE['C']}"
    out = benchmark(call)
    if provider == "gemm_bound":
        logits = out if mode == "fwd" else out[0]
        assert logits.shape == (SHAPE["B"], SHAPE["C"])
    elif mode == "fwd":
        with torch.no_grad():
            if provider in MARGIN_LOSSES:
                want = M.providers("cpu")["reference"](x, w, y)
            else:
                want = F.cross_entropy(x @ w.T, y)
        torch.testing.assert_close(out.double(), want.double(), rtol=1e-4, atol=1e-4)
    else:
        grads = [t.grad for t in (x, w) if t.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
