"""The quick CPU benchmark set under pytest-benchmark (not part of the test suite):

pip install pytest-benchmark && pytest bench/test_bench_quick.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from bench import bench_margin_ce as M  # noqa: E402

SHAPE = dict(B=64, D=512, C=20_000)
PROVIDERS = ["mdk_torch", "reference", "insightface_eager", "torch_linear_ce", "gemm_bound"]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_margin_ce_quick(benchmark, provider, mode):
    torch.manual_seed(0)
    x, w, y = M.make_inputs(SHAPE["B"], SHAPE["D"], SHAPE["C"], torch.float32, "cpu")
    call = M.callables(M.providers("cpu")[provider], mode, x, w, y)
    benchmark.group = f"margin_ce {mode} B={SHAPE['B']} C={SHAPE['C']}"
    benchmark(call)
