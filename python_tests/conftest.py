"""Shared test setup: Triton interpreter on CPU-only machines, the tolerance table, helpers.

TRITON_INTERPRET must be set before any Triton kernel is decorated, i.e. before mdkernels is imported.
"""

from __future__ import annotations

import contextlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import mdkernels  # noqa: E402,F401
from mdkernels.ops._common.env import HAS_TRITON, interpreting  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

try:  # hypothesis profiles (test_fuzz.py): "ci" by default, --hypothesis-profile=long by hand
    from hypothesis import HealthCheck, settings

    _quiet = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    settings.register_profile("ci", derandomize=True, max_examples=12, deadline=None, print_blob=True,
                              suppress_health_check=_quiet)  # fmt: skip
    settings.register_profile("long", max_examples=1000, deadline=None, print_blob=True, suppress_health_check=_quiet)
    # scripts/soak.py: MDK_SOAK_EXAMPLES base examples (x the per-backend factor of test_fuzz.py), random draws
    settings.register_profile("soak", max_examples=int(os.environ.get("MDK_SOAK_EXAMPLES", "100")), deadline=None,
                              print_blob=True, suppress_health_check=_quiet, database=None)  # fmt: skip
    settings.load_profile("ci")
except ImportError:  # hypothesis is in the test extra; without it test_fuzz.py skips
    pass
TRITON_RUNS = HAS_TRITON and (HAS_CUDA or interpreting())

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


def mdk_process(*args: str):
    """``mdk ARGS`` in a child process, from outside the tree: the package under test (installed in CI),
    not the sources in the working directory."""
    import subprocess
    import sys
    import tempfile

    cmd = [sys.executable, "-m", "mdkernels.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tempfile.gettempdir())


# ---- inputs and probes shared by the op test files ------------------------------------------------------
def make(B, D, C, dtype, device="cpu", seed=0, ignore=True, pull=2.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    # pull some rows towards their centers so targets are not all near 90 degrees
    y = torch.randint(0, C, (B,), generator=g)
    x = x + pull * w[y] * torch.rand(B, 1, generator=g, dtype=torch.float64)
    if ignore and B > 2:
        y[B // 2] = -1
    return (
        x.to(device=device, dtype=dtype).requires_grad_(),
        w.to(device=device, dtype=dtype).requires_grad_(),
        y.to(device),
    )


class LargestAllocation(TorchDispatchMode):
    """Records the largest floating tensor any aten op produces while active (the Triton interpreter's
    own uint8 storage copies of kernel arguments are not ours and are not counted)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is torch.ops.aten.set_:  # the interpreter re-viewing argument storage
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.largest = max(self.largest, t.numel())
        return out


def grads(loss, *inputs):
    """``(loss, d loss / d input for each input)``, detached."""
    return (loss.detach(), *torch.autograd.grad(loss, inputs))


def check_all(out, ref, dtype, what):
    """Every entry of ``out`` (loss, then gradients) against ``ref`` within the dtype's tolerance."""
    for name, a, b in zip(("loss", "grad 1", "grad 2"), out, ref, strict=False):
        assert a.shape == b.shape, f"{what} {name}"
        assert_close(a, b, dtype, f"{what} {name}")


def teacher_of(x, w, y, scale=0.5, seed=1):
    """Teacher embeddings close to their own centers (every teacher cosine > 0)."""
    from mdkernels import reference as R

    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.device, x.dtype)
    return (R.normalize(w.detach()[y.clamp_min(0)]) + scale * R.normalize(noise)).to(x.dtype)


def check_gpu_half_precision(fn, backend: str, dtype: torch.dtype, tol: float, centers_grad: bool = False,
                             device: str = "cuda") -> None:  # fmt: skip
    """``fn(module, x, w, **kw)`` in a 16-bit dtype on the GPU (the ``gpu`` fixture's device) against the fp64
    reference: the loss within ``tol`` and each gradient (the embeddings'; the centers' too with ``centers_grad``)
    within ``tol`` relative."""
    from mdkernels import reference as R

    x, w, y = make(67, 500, gpu_classes(4099), dtype, device)
    xd = x.detach().double().requires_grad_()
    wd = w.detach().double().requires_grad_(centers_grad)
    wf = w.detach().requires_grad_(centers_grad)
    truth = grads(fn(R, xd, wd, y), xd, *([wd] if centers_grad else []))
    fast = grads(fn(mdkernels, x, wf, y, backend=backend), x, *([wf] if centers_grad else []))
    assert abs(fast[0].item() - truth[0].item()) <= tol * max(1.0, abs(truth[0].item()))
    for a, b in zip(fast[1:], truth[1:], strict=True):
        rel = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
        assert rel <= tol


# ---- GPU tests, and the simulated GPU that runs them on the CPU -------------------------------------------------
# ``gpu``: the tests bench/gpu_check.sh runs on a lent GPU (-m gpu). On the CPU each runs on a simulated H100
# (the ``gpu`` fixture), unless it is also marked ``needs_cuda``: its assertion needs CUDA itself (graph replay,
# events, sync debug mode, a second GPU), and a CPU-side test of its logic stands beside it. A gpu test that
# takes neither road is a collection error (UNROUTED, checked by test_gpu_readiness.py).
SIMULATED = os.environ.get("MDK_SIMULATE_GPU", "") != ""  # bench/gpu_check.sh --dry-run: the whole process
UNROUTED: list[str] = []


def pytest_collection_modifyitems(config, items):
    needs_cuda = pytest.mark.skip(reason="needs a CUDA device (a CPU-side test checks its logic)")
    only_simulated = pytest.mark.skip(reason="on the CPU, GPU tests run on the simulated H100 of the dry run: "
                                             "MDK_SIMULATE_GPU=h100 pytest -m gpu (docs/testing.md)")  # fmt: skip
    for item in items:
        if "gpu" not in item.keywords:
            continue
        if "needs_cuda" not in item.keywords and "gpu" not in getattr(item, "fixturenames", ()):
            UNROUTED.append(item.nodeid)
        if HAS_CUDA:
            continue
        if "needs_cuda" in item.keywords:
            item.add_marker(needs_cuda)
        elif not SIMULATED:
            item.add_marker(only_simulated)


@pytest.fixture
def gpu():
    """The device of a ``gpu`` test: "cuda" on a GPU; on the CPU "cpu", under a simulated H100
    (:func:`mdkernels.ops._common.env.simulate_gpu`: its 132 SMs size the split-C grids, its sm_90 tiles run in the
    Triton interpreter, the CUDA emulator gets its 227 KiB of shared memory and runs ``backend="cuda"``)."""
    if HAS_CUDA:
        yield "cuda"
        return
    from mdkernels import _cuda_ext
    from mdkernels.ops._common.env import simulate_gpu

    if not TRITON_RUNS:
        pytest.skip("needs Triton (the interpreter) to simulate a GPU")
    with simulate_gpu("h100"), (_cuda_ext.emulated() if _cuda_ext.emu is not None else contextlib.nullcontext()):
        yield "cpu"


def gpu_classes(C: int) -> int:
    """A GPU test's class count: ``C`` on a GPU; on the simulated one at most 131 (the interpreter runs each program
    in Python, a minute per call at 4,099 classes). The paths stay the GPU's: with 132 SMs every class tile is its
    own split-C program at either size (at 131 classes and the H100's tiles, 3 to 9 of them, the last one ragged),
    and D and B, which pick the tiles, are unchanged."""
    return C if HAS_CUDA else min(C, 131)


def gpu_backends(*names: str) -> list[str]:
    """``names`` with "cuda" kept only where the CUDA module (on a GPU) or its emulator (on the CPU) is built."""
    from mdkernels import _cuda_ext

    have_cuda = _cuda_ext.built() if HAS_CUDA else _cuda_ext.emu is not None
    return [n for n in names if n != "cuda" or have_cuda]


@pytest.fixture(scope="session", autouse=True)
def _outside_the_tree(tmp_path_factory):
    """The whole session runs from an empty folder: a child ``python -m ...`` or ``python -c ...`` puts its
    working directory first on sys.path, and from the repository root it would import the source tree's
    mdkernels (without its built modules) instead of the package under test (installed, in CI)."""
    here = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(here)


def _global_flags() -> tuple:
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.are_deterministic_algorithms_enabled(), torch.get_num_threads(),
            torch.get_default_dtype())  # fmt: skip


@pytest.fixture(autouse=True)
def _independent_of_order():
    """No test depends on the order tests run in: each starts from the same global RNG state, and none may leave
    a global flag (TF32, deterministic mode, threads, the default dtype) changed for the next."""
    torch.manual_seed(20261207)
    before = _global_flags()
    yield
    after = _global_flags()
    assert after == before, f"the test changed a global flag and did not restore it: {before} -> {after}"


@pytest.fixture
def tf32():
    """``tf32(flag)`` sets ``torch.backends.cuda.matmul.allow_tf32`` for the test and restores it after
    (monkeypatch cannot: the flag is a property of torch's cuBLAS module, not an attribute it can put back)."""
    before = torch.backends.cuda.matmul.allow_tf32

    def set_flag(flag: bool) -> None:
        torch.backends.cuda.matmul.allow_tf32 = flag

    yield set_flag
    torch.backends.cuda.matmul.allow_tf32 = before
