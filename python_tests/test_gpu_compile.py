"""Every Triton kernel compiles to a cubin for sm_80 and sm_90 with its launcher's constexprs, without
register spills at its default configuration (ptxas -v).

The interpreter accepts code the GPU compiler rejects; this runs the real compiler (no GPU needed)
in a subprocess without TRITON_INTERPRET.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mdkernels.ops._common.env import HAS_TRITON

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # compile sweeps: docs/testing.md's quick tier (-m "not slow") leaves them out

@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_all_kernels_compile_for_sm80_and_sm90():
    """Compiled as launches compile them (divisibility hints), with the ptxas Triton uses for each arch: no
    spill, shared memory within the family's limit, wgmma in every sm_90 16-bit margin kernel (B >= 64)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "mdkernels.tools.gpu_compile"], capture_output=True, text=True, env=env)
    lines = res.stdout.splitlines()
    assert res.returncode == 0, "\n".join(line for line in lines if line.startswith("FAIL")) + res.stderr[-3000:]
    kernels = [line for line in lines if line.startswith(("ok", "FAIL"))]
    expected = sum(len(_specs(arch)) for arch in (80, 90))
    assert len(kernels) == expected and all(line.startswith("ok") for line in kernels), res.stdout[-3000:]
    for half in ("torch.bfloat16", "torch.float16"):
        margin = [line for line in kernels if line[5:].startswith("sm_90 margin_") and half in line]
        assert margin and all(", wgmma" in line for line in margin), "\n".join(margin)


def _specs(arch):
    code = f"from mdkernels.tools.gpu_compile import all_specs; print(len(all_specs({arch})))"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return range(int(out.stdout))


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_compile_check_fails_a_kernel_over_the_shared_memory_of_sm86():
    """The check applies sm_86/sm_89's 99 KiB to sm_80 kernels (Triton compiles the same tile there): the
    autocast forward with D = 512 resident (146 KiB: the tile that tile_config caps for autocast) fails it."""
    code = """
import torch
from mdkernels.ops._common import tiles
from mdkernels.ops.margin_ce import triton_backend as tb
from mdkernels.tools import gpu_compile as G

tiles._TILES[("forward", "half", "ampere")]["full_d"] = 512
real = tiles.tile_config
def resident(*a, **k):
    return dict(real(*a, **k), BLOCK_D=512, BLOCK_DO=512, FULL_D=True) if a[0] == "forward" else real(*a, **k)
tiles.tile_config = resident
tb.tile_config = tiles.tile_config
spec = [s for s in tb.compile_specs(torch.float32, 80) if "amp-bf16 need_o=True" in s[0]][0]
G._JOBS[:] = [(80, spec)]
print(G._check(0))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "(False, 'FAIL sm_80 margin_ce_forward" in res.stdout and "> 99 KiB (sm_86/sm_89)" in res.stdout, res.stdout


@pytest.mark.parametrize("source", ["margin_ce.cu", "margin_target.cu", "l2norm.cu", "angular_distill.cu"])
def test_cuda_kernels_compile_for_the_default_archs_without_spills(source):
    """Every CUDA C++ kernel, every dtype and layout instantiation, for each arch of the default build
    (sm_80 and sm_90 cubins, compute_90 PTX): ``ptxas -v`` reports no spill, and the static_asserts on the
    shared-memory layouts (A100, and the 99 KiB of sm_86/89/120) hold."""
    from mdkernels.tools import cuda_compile

    nvcc = cuda_compile.find_nvcc()
    if nvcc is None:
        if os.environ.get("MDK_EXPECT_CUDA_EXT") == "1":
            pytest.fail("CI has nvcc, but none was found")
        pytest.skip("needs nvcc (CI has it)")
    csrc = REPO / "csrc"  # beside these tests: the checkout CI runs them from (the package may be installed)
    if not csrc.is_dir():
        pytest.skip(f"needs the source tree: {csrc} not found")
    for arch in cuda_compile.DEFAULT_ARCHS.split(";"):
        ok, line = cuda_compile.compile_source(nvcc, csrc / source, arch, [])
        assert ok, line
