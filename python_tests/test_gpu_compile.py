"""Every Triton kernel a launch can choose compiles to a cubin without register spills and within its GPU family's
shared memory (ptxas -v), and every CUDA C++ kernel of the default build.

The interpreter accepts code the GPU compiler rejects; this runs the real compiler (no GPU needed) in a subprocess
without TRITON_INTERPRET: the headline subset here, the whole launch space by hand, recorded in
bench/results/compile_check.txt (its freshness checked here).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mdkernels.ops._common.env import HAS_TRITON

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # compile sweeps: docs/testing.md's quick tier (-m "not slow") leaves them out

def _no_interpreter() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _python(code: str) -> str:
    """``code`` in a child Python without the interpreter (the compile check needs the real compiler); its stdout."""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_no_interpreter())
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_the_headline_kernels_compile_for_sm80_and_sm90():
    """The CI subset of the launch space (gpu_compile.HEADLINE: each kernel at D = 128, 512 and 1024, the two batch
    classes, K = 1 and 3, top-k at k = 9 and 17, every dtype path), compiled as launches compile them, with the ptxas
    Triton uses for each arch: no spill, shared memory within the family's limit, wgmma in every sm_90 16-bit margin
    kernel of 64 rows or classes. The whole space, every arch, is bench/results/compile_check.txt (next test)."""
    res = subprocess.run([sys.executable, "-m", "mdkernels.tools.gpu_compile", "--archs", "80,90"], capture_output=True,
                         text=True, env=_no_interpreter())  # fmt: skip
    lines = res.stdout.splitlines()
    assert res.returncode == 0, "\n".join(line for line in lines if line.startswith("FAIL")) + res.stderr[-3000:]
    kernels = [line for line in lines if line.startswith(("ok", "FAIL"))]
    count = "print(sum(1 for a in (80, 90) for s in G.launch_space(a) if G.HEADLINE.search(s[0])))"
    expected = int(_python("from mdkernels.tools import gpu_compile as G\n" + count))
    assert len(kernels) == expected > 150 and all(line.startswith("ok") for line in kernels), res.stdout[-3000:]
    for half in ("bfloat16", "float16"):
        margin = [line for line in kernels if line[5:].startswith(f"sm_90 margin_ce_center_grad {half} KP=1 ")]
        assert margin and all(", wgmma" in line for line in margin), "\n".join(margin)


RECORD = REPO / "bench" / "results" / "compile_check.txt"


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.skipif(not RECORD.exists(), reason="needs the source tree (bench/results)")
def test_the_recorded_full_check_covers_todays_launch_space():
    """``python -m mdkernels.tools.gpu_compile --all --record bench/results/compile_check.txt`` compiled every distinct
    kernel the launchers can choose, for every arch of tiles.GPU_ARCHS: the record names its commit and Triton, says
    every kernel was ok, and its fingerprint is that of today's launch space (a new tile, option or kernel source
    changes it: then the full check must run again, about an hour on 2 cores)."""
    text = RECORD.read_text()
    head = dict(line.split(": ", 1) for line in text.splitlines()[2:8])
    assert head["commit"] and "unknown" not in head["commit"], head
    ok, total = re.search(r"(\d+) of (\d+) kernels ok", head["result"]).groups()
    assert ok == total and int(total) > 3000, head["result"]
    assert not [line for line in text.splitlines() if line.startswith("FAIL")]
    archs = [int(a) for a in re.findall(r"sm_(\d+)", head["archs"])]
    code = f"from mdkernels.ops._common.tiles import GPU_ARCHS\nprint(sorted(GPU_ARCHS) == {sorted(archs)!r})"
    assert _python(code).strip() == "True", f"the record covers {archs}, not every arch of GPU_ARCHS"
    code = f"from mdkernels.tools import gpu_compile as G\nprint(G.fingerprint({archs!r}))"
    assert _python(code).strip() == head["fingerprint"], (
        "the launch space changed since bench/results/compile_check.txt was recorded: run "
        "python -m mdkernels.tools.gpu_compile --all --record bench/results/compile_check.txt")


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_the_representatives_stand_for_every_batch_and_embedding_size():
    """The launch space compiles one (B, D) per tile (tiles.shape_representatives): true only while the launchers'
    tiles depend on B only through B < 64 and on D only through next_pow2(D) and D % 16. Walked here over every B in
    1..8192 and every D in 64..1024, for every kernel (the center gradient with and without the fused update), dtype
    path, K class and arch; and top-k's tile over every k in
    1..256."""
    code = """
import torch, triton
# triton's next_power_of_2 goes through its constexpr wrapper (4 us a call): the same integers, without it (the
# walk makes about 3 million tile_config calls)
triton.next_power_of_2 = lambda n: 1 << (int(n) - 1).bit_length()
from mdkernels.ops._common import tiles as T
from mdkernels.ops.cosine_topk import triton_backend as topk
assert [T.triton.next_power_of_2(n) for n in (1, 2, 3, 16, 17, 500, 1024)] == [1, 2, 4, 16, 32, 512, 1024]
bad = []
for arch in T.GPU_ARCHS:
    for dtype, op in T.GPU_DTYPE_PATHS:
        for kernel, update in (("forward", False), ("center_grad", False), ("center_grad", True),
                               ("kd_forward", False), ("kd_center_grad", False)):  # fmt: skip
            for K in T.SUBCENTER_REPRESENTATIVES if not kernel.startswith("kd") else (1,):
                want = {}
                for B in range(1, 8193):
                    rb, _ = T.tile_representative(B, 500)
                    got = T.tile_config(kernel, dtype, B, 500, K, arch=arch, op_dtype=op, update=update)
                    if want.setdefault(rb, got) != got:
                        bad.append((arch, dtype, op, kernel, update, K, "B", B))
                want = {}
                for D in range(64, 1025):
                    _, rd = T.tile_representative(1000, D)
                    got = T.tile_config(kernel, dtype, 1000, D, K, arch=arch, op_dtype=op, update=update)
                    if want.setdefault(rd, got) != got:
                        bad.append((arch, dtype, op, kernel, update, K, "D", D))
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        for k in range(1, 257):
            rep = [r for r in topk.K_REPRESENTATIVES if triton.next_power_of_2(r) == triton.next_power_of_2(k)][0]
            for D in (100, 500):
                if topk.tile_config(dtype, D, k, arch) != topk.tile_config(dtype, D, rep, arch):
                    bad.append((arch, dtype, "topk", k, D))
        for D in range(64, 1025):
            rd = T.tile_representative(1000, D)[1]
            if topk.tile_config(dtype, D, 10, arch) != topk.tile_config(dtype, rd, 10, arch):
                bad.append((arch, dtype, "topk D", D))
print(len(bad), bad[:5])
"""
    assert _python(code).startswith("0 "), _python(code)[:2000]


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
