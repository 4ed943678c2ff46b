"""The hazards a first GPU user would hit, each caught here without a GPU (see also test_sync_free.py and
test_gpu_compile.py). The ``gpu`` tests at the end show the rest on the hardware.

* launches on the right device: every call into the CUDA module goes through ``_cuda_ext.call``;
* the CUDA margin kernels on 99 KiB GPUs (sm_86/89/120), and their shared-memory attribute per device;
* what a build runs on (its archs) and on which driver;
* the Triton path never needs the CUDA module;
* autocast: 16-bit operands on the fp32 centers, no 16-bit copy of them, fp32 gradients;
* fp32 dots in tf32x3, whatever ``allow_tf32`` says;
* the centers and embeddings read with their strides (pytorch-metric-learning's ``(D, C)`` parameter);
* 16-bit Triton kernels on the CPU (the interpreter rounds every 16-bit operand as a GPU does), split-C;
* the true GEMM count, as the README states it.
"""

from __future__ import annotations

import ast
import contextlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import FUSED_BACKENDS, HAS_CUDA, TRITON_RUNS, assert_close, assert_close_to_truth, device_for, make
from test_margin_ce import CONFIGS, eager_same_dtype, run
from torch.utils._python_dispatch import TorchDispatchMode

import mdkernels
from mdkernels import _cuda_ext
from mdkernels import reference as R
from mdkernels.ops._common import probe, tiles
from mdkernels.ops._common.env import simulate_gpu, simulated

REPO = Path(__file__).resolve().parents[1]
GPU_CHECK = REPO / "bench" / "gpu_check.sh"
needs_emulator = pytest.mark.skipif(_cuda_ext.emu is None, reason="CUDA module (and its emulator) not built")

# "here", and on a CPU a simulated H100 beside it, in the full tier only (its kernels are the interpreter's at the
# GPU's tiles: slow here); not where the process already simulates one, and not where test_gpu_check_dry_run runs
# (its step 5 runs these tests in a process that simulates the H100: here they would run twice)
SIMULATED_H100 = pytest.param("simulated-h100", marks=pytest.mark.slow)
_DRY_RUN_COVERS = GPU_CHECK.exists() and _cuda_ext.emu is not None
WHERE = ["here"] + ([] if HAS_CUDA or simulated() is not None or _DRY_RUN_COVERS else [SIMULATED_H100])
needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="needs Triton (GPU or interpreter)")


# ---- every call into the CUDA module: on the tensors' GPU ---------------------------------------------------
def test_every_cuda_module_call_goes_through_the_device_guard():
    """Kernels launch on the current device: a tensor on cuda:1 while cuda:0 is current would launch on the
    wrong GPU. The one door is ``_cuda_ext.call``, which makes the tensor's GPU current; no other code may call
    the module's kernels (AST: no ``<...>.ext.<name>(...)`` call outside mdkernels/_cuda_ext.py)."""
    kernels = set(_cuda_ext.compiled.kernels) if _cuda_ext.compiled is not None else {
        "l2norm_forward", "l2norm_backward", "angular_forward", "angular_backward", "margin_ce_forward",
        "margin_ce_center_grad", "margin_target_forward"}  # fmt: skip
    offenders = []
    for path in (REPO / "mdkernels").rglob("*.py"):
        if path.name == "_cuda_ext.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in kernels:
                receiver = ast.unparse(node.func.value).split(".")[-1]  # ext.margin_ce_forward, not the custom op
                if receiver in ("ext", "compiled", "emu", "_cuda", "_cuda_emu"):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, f"calls into the CUDA module that bypass _cuda_ext.call: {offenders}"


def test_call_makes_the_tensors_gpu_current(monkeypatch):
    seen = []

    class FakeModule:
        def l2norm_forward(self, *args):
            seen.append(("launch", args[-1]))

    @contextlib.contextmanager
    def device(d):
        seen.append(("enter", str(d)))
        yield
        seen.append(("exit", str(d)))

    t = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    monkeypatch.setattr(_cuda_ext, "ext", FakeModule())
    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(_cuda_ext, "stream_of", lambda t: f"stream of {t.device}")
    _cuda_ext.call("l2norm_forward", t, 1, 2)
    assert seen == [("enter", "cuda:1"), ("launch", "stream of cuda:1"), ("exit", "cuda:1")]


# ---- shared memory: per device, and the 99 KiB GPUs ---------------------------------------------------------
@pytest.mark.slow
@needs_emulator
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_margin_kernels_on_a_99_kib_gpu_and_on_two_devices(dtype):
    """The launcher reads the device's opt-in shared memory (never its capability): 227 KiB (an H100) gives
    the wide layout, 99 KiB (RTX 30xx/40xx, A10, L4, L40S) the 128-column one; both equal the reference. The
    attribute is set per (kernel, device): device 1 after device 0 launches (the emulator refuses a launch
    over 48 KiB without the attribute on that device, as a GPU does)."""
    emu = _cuda_ext.emu
    x, w, y = make(67, 300, 257, dtype)
    ref = run(R.margin_cross_entropy, x.detach().float().requires_grad_(), w.detach().float().requires_grad_(), y)
    try:
        for device, optin in ((0, 0), (1, 0), (2, 99 * 1024)):
            emu.set_device(device, optin)
            with _cuda_ext.emulated():
                out = run(mdkernels.margin_cross_entropy, x, w, y, backend="cuda")
            for what, a, b in zip(("loss", "dx", "dW"), out, ref, strict=True):
                if dtype == torch.float32:
                    assert_close(a.float(), b, torch.float32, what)
                else:  # 16-bit operands: each of the loss and both gradients within 2% (relative 2-norm)
                    rel = ((a.double() - b.double()).norm() / b.double().norm()).item()
                    assert rel < 2e-2, (device, what, rel)
        emu.set_device(3, 48 * 1024)  # below even the narrow layout: refused by name, never launched
        with _cuda_ext.emulated(), pytest.raises(RuntimeError, match="bytes of shared memory per block; this GPU"):
            mdkernels.margin_cross_entropy(x, w, y, backend="cuda")
    finally:
        emu.reset_devices()


@pytest.mark.skipif(_cuda_ext.compiled is None, reason="CUDA module not built")
def test_backend_cuda_is_refused_before_launch_on_a_small_gpu(monkeypatch):
    """``require`` decides from ``shared_memory_per_block_optin`` (mocked here), before any launch."""
    need = _cuda_ext.margin_smem_need(torch.bfloat16)
    assert need <= 99 * 1024 - 64 < _cuda_ext.compiled.margin_smem_bytes(2, True, 256)
    props = SimpleNamespace(name="a GPU with 64 KiB", shared_memory_per_block_optin=64 * 1024)
    t = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0), dtype=torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: props)
    assert not _cuda_ext.margin_fits(t)
    props.shared_memory_per_block_optin = 99 * 1024  # sm_86/89: fits the narrow layout
    assert _cuda_ext.margin_fits(t)
    props.shared_memory_per_block_optin = 64 * 1024
    from mdkernels import backends

    monkeypatch.setattr(_cuda_ext, "usable", lambda *a: True)
    with pytest.raises(ValueError, match=r"need \d+ bytes of shared memory .* a GPU with 64 KiB allows 65536"):
        backends.require("margin_ce", "cuda", t)
    assert backends.gpu_backend("margin_ce", t, 1024, 85742, 512) == "triton"


# ---- what a build runs on ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "archs, runs, not_runs",
    [("80-real;90-real;90-virtual", [80, 86, 87, 89, 90, 100, 103, 120], [70, 75]),
     ("80;90", [80, 86, 89, 90, 100, 120], [75]),
     ("80-real", [80, 86, 89], [75, 90, 100, 120]),
     ("90-real", [90], [80, 86, 100, 120])],
)  # fmt: skip
def test_arch_runs(archs, runs, not_runs):
    """A cubin runs on its major's later minors (sm_80 code on sm_86/89), never on another major; PTX runs on
    every later GPU (compute_90 on Blackwell's sm_100/sm_120)."""
    assert all(_cuda_ext.arch_runs(archs, c) for c in runs)
    assert not any(_cuda_ext.arch_runs(archs, c) for c in not_runs)


def test_default_archs_cover_what_users_have():
    cmake = (REPO / "CMakeLists.txt").read_text() if (REPO / "CMakeLists.txt").exists() else None
    if cmake is None:
        pytest.skip("needs the source tree")
    default = re.search(r'set\(MDK_CUDA_ARCHS "([^"]+)"', cmake).group(1)
    setup = (REPO / "setup.py").read_text()
    assert f'"MDK_CUDA_ARCHS", "{default}"' in setup, "setup.py and CMakeLists.txt must default to the same archs"
    from mdkernels.tools import cuda_compile

    assert cuda_compile.DEFAULT_ARCHS == default  # the compile check compiles what the build builds
    # A100; RTX 30xx, A10, A40; RTX 40xx, L4, L40S; H100/H200; B200; RTX 50xx
    for capability in (80, 86, 89, 90, 100, 120):
        assert _cuda_ext.arch_runs(default, capability), capability
    if _cuda_ext.compiled is not None:
        assert _cuda_ext.compiled.archs.replace(",", ";") == default


def test_an_old_driver_is_named_not_crashed(monkeypatch):
    """A module linked with CUDA 13's runtime on a driver for CUDA 12.4: not usable, and info() says why."""
    fake = SimpleNamespace(driver_version=lambda: 12040, cuda_runtime_version=13000, device_count=lambda: 1,
                           archs="80-real;90-real;90-virtual", kernels=[])  # fmt: skip
    monkeypatch.setattr(_cuda_ext, "compiled", fake)
    _cuda_ext.unusable_reason.cache_clear()
    try:
        why = _cuda_ext.unusable_reason()
        assert "built with CUDA 13.0" in why and "580.65" in why and "supports CUDA 12.4" in why
        info = mdkernels.info()
        assert info["cuda_extension"] and not info["cuda_extension_usable"] and info["cuda_extension_note"] == why
        fake.driver_version = lambda: 0
        _cuda_ext.unusable_reason.cache_clear()
        assert _cuda_ext.unusable_reason() == "no NVIDIA driver found"
    finally:
        _cuda_ext.unusable_reason.cache_clear()


@needs_triton
def test_the_triton_path_never_calls_the_cuda_module(monkeypatch):
    """Row norms, the target terms and the normalisation backward of backend='triton' (and 'torch') run in
    torch or Triton: a module that cannot run on this driver must not break them."""

    class Poisoned:
        def __getattr__(self, name):
            raise AssertionError(f"the CUDA module was called: {name}")

    monkeypatch.setattr(_cuda_ext, "ext", Poisoned())
    monkeypatch.setattr(_cuda_ext, "usable", lambda *a: True)  # even where it claims it could run
    for backend in FUSED_BACKENDS:
        x, w, y = make(9, 40, 70, torch.float32, device_for(backend))
        run(mdkernels.margin_cross_entropy, x, w, y, backend=backend)
        t = x.detach() + 0.1
        loss = mdkernels.margin_kd_loss(x, t, w, y, backend=backend) + mdkernels.margin_distillation_loss(
            x, w, y, teacher_embeddings=t, backend=backend)
        loss.backward()


# ---- autocast ---------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("op", ["margin_ce", "margin_kd"])
@pytest.mark.parametrize("where", WHERE)
def test_autocast_runs_16_bit_operands_on_fp32_centers(op, where):
    """Under torch.autocast the fused ops take fp32 embeddings and centers, read fp32 tiles, normalise in fp32
    and cast the dots' operands to bf16 in registers (the interpreter rounds them exactly), accumulate in fp32
    and return fp32 gradients: within 2x the error of eager autocast (its matmuls in bf16) against the fp64
    truth, measurably not the plain fp32 result, and without a 16-bit (or any) copy of the C x D centers: no
    tensor with dimensions C and D but W's fp32 gradient, none with B and C. By shape, not size: on an H100's 132
    SMs split-C's ``(splits, B, D)`` partials outgrow C x D / 2 with nothing wrong (simulated-h100: the CPU runs
    that GPU's grid and tiles)."""

    with simulate_gpu("h100") if where == "simulated-h100" else contextlib.nullcontext():
        _autocast_case(op)


def _autocast_case(op):
    dev = "cuda" if HAS_CUDA else "cpu"
    B, D, C = 67, 128, 1017
    x, w, y = make(B, D, C, torch.float32, dev)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(x.device)
    t = (x.detach() + 0.3 * noise).requires_grad_(False)

    def loss_of(module, xx, ww, **kw):
        if op == "margin_ce":
            return module.margin_cross_entropy(xx, ww, y, **kw)
        return module.margin_kd_loss(xx, t.to(xx.dtype), ww, y, **kw)

    truth = run(lambda a, b, c: loss_of(R, a, b), x.detach().double().requires_grad_(),
                w.detach().double().requires_grad_(), y)  # fmt: skip
    plain32 = run(lambda a, b, c: loss_of(mdkernels, a, b, backend="triton"), x, w, y)
    with torch.autocast(dev, dtype=torch.bfloat16):
        eager = run(lambda a, b, c: loss_of(R, a, b), x, w, y)
        fused = run(lambda a, b, c: loss_of(mdkernels, a, b, backend="triton"), x, w, y)
        with probe.watch() as forward:  # sees inside the custom ops
            loss = loss_of(mdkernels, x, w, backend="triton")
    with probe.watch() as backward:
        loss.backward()
    assert forward.created and not forward.holding(C, D), f"the forward copied the centers: {forward.holding(C, D)}"
    assert not forward.holding(B, C) and not backward.holding(B, C), "a B x C tensor"
    centers = [(c[1], c[3]) for c in backward.holding(C, D)]
    assert centers == [(w.numel(), torch.float32)], f"only the fp32 gradient of W: {centers}"
    for name, f, e, tr, p32 in zip(("loss", "dx", "dw"), fused, eager, truth, plain32, strict=True):
        assert f.dtype == torch.float32, name  # fp32 master weights get fp32 gradients
        assert_close_to_truth(f, e, tr, f"autocast {op} {name}")
        assert not torch.allclose(f, p32, rtol=1e-6, atol=0), f"{name}: the bf16 operands were not used"


def test_autocast_choices():
    """The custom ops carry autocast's operand dtype; backend='cuda' has no mixed-precision kernels and says
    so; the torch backend computes autocast calls in fp32."""
    x, w, y = make(9, 40, 70, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch_amp = run(mdkernels.margin_cross_entropy, x, w, y, backend="torch")
        with pytest.raises(ValueError, match="no kernel for autocast .* use backend='triton'"):
            mdkernels.margin_cross_entropy(x, w, y, backend="cuda")
    for a, b in zip(torch_amp, run(mdkernels.margin_cross_entropy, x, w, y, backend="torch"), strict=True):
        assert torch.equal(a, b)


# ---- fp32 precision -------------------------------------------------------------------------------------------
def test_fp32_dots_are_tf32x3_whatever_allow_tf32_says(tf32):
    if not mdkernels.info()["triton_available"]:
        pytest.skip("needs triton")
    for allow in (False, True):
        if torch.backends.cuda.is_built():  # a CPU build of torch has no such switch to set
            tf32(allow)
        assert tiles.triton_flags(torch.float32, on_cuda=True)["PRECISION"] == "tf32x3"
    assert tiles.triton_flags(torch.float64, on_cuda=True)["PRECISION"] == "ieee"


# ---- strides: no copy of the centers ---------------------------------------------------------------------------
class NewStorage(TorchDispatchMode):
    """Floating tensors of at least ``floor`` elements that aten ops return in new storage (views and in-place
    results are not allocations)."""

    def __init__(self, floor):
        super().__init__()
        self.floor, self.seen = floor, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is torch.ops.aten.set_:  # the interpreter re-viewing argument storage
            return out
        given = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                 if isinstance(t, torch.Tensor)}  # fmt: skip
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() >= self.floor:
                if t.untyped_storage().data_ptr() not in given:
                    self.seen.append((t.numel(), t.dtype))
        return out


def _allocations_of(fn, *dims):
    """``(numel, dtype)`` of the floating tensors ``fn`` creates with a dimension of each size in ``dims``, inside
    the fused ops too (:mod:`mdkernels.ops._common.probe`)."""
    with probe.watch() as seen:
        fn()
    assert seen.created, "the probe saw nothing"
    return [(c[1], c[3]) for c in seen.holding(*dims) if c[3].is_floating_point]


@pytest.mark.parametrize("backend", FUSED_BACKENDS + (["cuda"] if _cuda_ext.emu is not None else []))
@pytest.mark.parametrize("where", WHERE)
def test_pml_layout_is_read_in_place(backend, where):
    """pytorch-metric-learning's ArcFaceLoss keeps ``W: (D, C)``; the drop-in passes ``W.t()``. The forward
    allocates nothing with dimensions C and D (it used to copy W every call), the backward one: W's gradient, in
    W's own layout. Values and gradients equal the reference. By shape: split-C's partials on an H100 are larger
    than C x D with nothing wrong (simulated-h100)."""

    if where == "simulated-h100" and backend == "torch":
        pytest.skip("the torch backend has no grid: nothing of the GPU's to simulate")
    sim = simulate_gpu("h100") if where == "simulated-h100" else contextlib.nullcontext()
    ctx = _cuda_ext.emulated() if backend == "cuda" else contextlib.nullcontext()
    B, D, C = 33, 40, 3001
    head = mdkernels.nn.ArcFaceLoss(C, D, backend=backend).to(device_for(backend))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        head.W.copy_(torch.randn(D, C, generator=g))
    x = torch.randn(B, D, generator=g).to(device_for(backend)).requires_grad_()
    y = torch.randint(0, C, (B,), generator=g).to(x.device)
    with sim, ctx:
        forward = _allocations_of(lambda: head(x, y), C, D)
        loss = head(x, y)
        backward = _allocations_of(lambda: loss.backward(), C, D)
    assert forward == [] and backward == [(C * D, torch.float32)], (forward, backward)
    assert head.W.grad.stride() == head.W.stride()
    xr, wr = x.detach().requires_grad_(), head.W.detach().t().requires_grad_()
    ref = R.margin_cross_entropy(xr, wr, y, m2=math.radians(28.6), fallback=True)
    ref.backward()
    assert_close(loss.detach(), ref.detach(), torch.float32, "loss")
    assert_close(x.grad, xr.grad, torch.float32, "dx")
    assert_close(head.W.grad, wr.grad.t(), torch.float32, "dW")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_strided_embeddings_and_centers(backend):
    """Embeddings as a column slice of a wider tensor and as a transposed view, centers as a transposed view."""
    x, w, y = make(29, 70, 303, torch.float64, device_for(backend))
    wide = torch.cat([x.detach(), torch.zeros_like(x.detach())], 1)[:, :70].requires_grad_()  # row stride 140
    wt = w.detach().t().contiguous().t().requires_grad_()  # (C, D) with strides (1, C)
    xt = x.detach().t().contiguous().t().requires_grad_()  # (B, D) with strides (1, B)
    ref = run(R.margin_cross_entropy, x.detach().requires_grad_(), w.detach().requires_grad_(), y)
    for xx in (wide, xt):
        out = run(mdkernels.margin_cross_entropy, xx, wt, y, backend=backend)
        for name, a, b in zip(("loss", "dx", "dw"), out, ref, strict=True):
            assert_close(a, b, torch.float64, name)


# ---- 16-bit Triton kernels and split-C, on the CPU --------------------------------------------------------------
@pytest.mark.slow
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", ["arcface", "cosface", "filter"])
def test_half_precision_triton_kernels(dtype, config):
    """bf16/fp16 inputs on the Triton kernels, with every 16-bit operand rounded as on a GPU (n(x), n(W), P,
    G / gscale): within 2x the error of eager PyTorch in the same dtype against the fp64 truth."""
    kw = CONFIGS[config]
    x, w, y = make(67, 500, 1017, dtype, device_for("triton"))
    truth = run(R.margin_cross_entropy, x.detach().double().requires_grad_(), w.detach().double().requires_grad_(),
                y, **kw)  # fmt: skip
    plain = run(eager_same_dtype, x, w, y, **kw)
    fast = run(mdkernels.margin_cross_entropy, x, w, y, backend="triton", **kw)
    for name, f, p, t in zip(("loss", "dx", "dw"), fast, plain, truth, strict=True):
        assert f.dtype == (torch.float32 if name == "loss" else dtype)
        assert_close_to_truth(f, p, t, f"{config} {dtype} {name}")


@needs_triton
@pytest.mark.parametrize("splits", [2, 3])
def test_split_c_forward(monkeypatch, splits):
    """Split-C (the class range over programs, partials merged as flash-decoding does) runs on the CPU too when
    forced; the split sizes need not divide C."""
    from mdkernels.ops.margin_ce import triton_backend

    monkeypatch.setattr(triton_backend, "FORCE_SPLITS", splits)
    x, w, y = make(37, 96, 1017, torch.float64, device_for("triton"))
    for kw in (CONFIGS["arcface"], CONFIGS["filter"], dict(curricular_t=0.3)):
        ref = run(R.margin_cross_entropy, x, w, y, **kw)
        out = run(mdkernels.margin_cross_entropy, x, w, y, backend="triton", **kw)
        for name, a, b in zip(("loss", "dx", "dw"), out, ref, strict=True):
            assert_close(a, b, torch.float64, f"splits={splits} {name}")


# ---- the GEMM count, as the README states it ---------------------------------------------------------------------
@pytest.mark.slow
def test_readme_states_the_true_gemm_count():
    """The D split makes every column-block program rebuild the cosines over all of D: the README's table is
    the one :func:`tiles.gemm_units` computes from the default tiles."""
    docs = [p for p in (REPO / "README.md", REPO / "docs" / "design.md") if p.exists()]
    if not docs or not mdkernels.info()["triton_available"]:
        pytest.skip("needs the source tree and triton")
    text = "\n".join(p.read_text() for p in docs)
    rows = re.findall(r"^\| (bf16|fp32) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|", text, re.M)
    assert len(rows) >= 6, "the GEMM count table is missing"
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    code = f"""
import torch
from mdkernels.ops._common.tiles import gemm_units
for dtype, D, a80, f80, a90, f90 in {rows!r}:
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    got = (gemm_units(dt, int(D), 80), gemm_units(dt, int(D), 80, False), gemm_units(dt, int(D), 90),
           gemm_units(dt, int(D), 90, False))
    assert got == tuple(map(int, (a80, f80, a90, f90))), (dtype, D, got)
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} if interpreted else dict(os.environ)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.stdout.strip() == "ok", res.stderr[-2000:]


@pytest.mark.slow
def test_design_states_the_true_resident_d():
    """docs/design.md's table of the largest D each Triton kernel keeps resident, and the split width above it, is
    what :func:`tiles.tile_config` chooses (B = 1024, sm_80 and sm_90)."""
    page = REPO / "docs" / "design.md"
    if not page.exists() or not mdkernels.info()["triton_available"]:
        pytest.skip("needs the source tree and triton")
    rows = re.findall(r"^\| (forward|center_grad) \| (bf16|fp32) \| (\d+) \| (\d+) \| (\d+) \| (\d+) \|",
                      page.read_text(), re.M)  # fmt: skip
    assert len(rows) == 4, "the resident-D table is missing"
    code = f"""
import torch
from mdkernels.ops._common.tiles import tile_config
for kernel, dtype, r80, w80, r90, w90 in {rows!r}:
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    for arch, resident, width in ((80, int(r80), int(w80)), (90, int(r90), int(w90))):
        full = [D for D in range(64, 1025, 64) if tile_config(kernel, dt, 1024, D, arch=arch)["FULL_D"]]
        assert max(full) == resident and full == list(range(64, resident + 1, 64)), (kernel, dtype, arch, full)
        assert tile_config(kernel, dt, 1024, resident + 64, arch=arch)["BLOCK_DO"] == width, (kernel, dtype, arch)
print("ok")
"""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} if interpreted else dict(os.environ)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.stdout.strip() == "ok", res.stderr[-2000:]


# ---- bench/gpu_check.sh, dry ------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(not GPU_CHECK.exists(), reason="needs the source tree")
@needs_emulator
def test_gpu_check_dry_run(tmp_path):
    """The GPU session's call 1 on the CPU (``--dry-run``): info, every ``gpu`` test not needing CUDA on the simulated
    H100 (step 3), the CPU-side tests of the graph, sync and device logic (4), the autocast tests on the simulated
    H100 (5) and the 85k margin-CE row's plumbing (6a): every step rc=0, no test failed, five plain files in $OUT
    within the device tool's limits (at most 8, 2 folders down), nothing written into the repository."""
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "MDK_GPU_CHECK_ONLY": "2_ 3_ 4_ 5_ 6a"}
    before = sorted(p.name for p in (REPO / "bench" / "results").iterdir())
    res = subprocess.run(["bash", str(GPU_CHECK), "--dry-run"], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=1800)  # fmt: skip
    summary = (out / "summary.txt").read_text()
    assert res.returncode == 0 and summary.count(" rc=0 ") == 5, summary + res.stdout[-3000:] + res.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["log.txt", "rest.tar.gz", "results.csv", "summary.txt",
                                                     "tests.txt"]  # fmt: skip
    tests = (out / "tests.txt").read_text().splitlines()
    assert not [t for t in tests if " FAILURE " in t or " ERROR " in t], "\n".join(tests)
    by_step = {step: [t for t in tests if t.split()[0].startswith(step) and t.split()[1] == "PASSED"]
               for step in ("3_gpu_tests", "4_graph", "5_")}  # fmt: skip
    assert len(by_step["3_gpu_tests"]) >= 50 and by_step["4_graph"] and len(by_step["5_"]) >= 8, by_step
    for name in ("test_autocast_runs_16_bit_operands_on_fp32_centers", "test_pml_layout_is_read_in_place"):
        # WHERE leaves their simulated-H100 cases to this step
        assert any(f"::{name}[here-" in t for t in by_step["5_"]), (name, by_step["5_"])
    rows = (out / "results.csv").read_text()
    assert "Fake H100 (dry run)" in rows and ",mdk_cuda," in rows and ",mdk_triton," in rows
    import csv
    import tarfile

    timed = {r["provider"]: float(r["ms_median"]) for r in csv.DictReader(rows.splitlines())}
    assert all(math.isfinite(timed[p]) for p in ("mdk_cuda", "mdk_triton", "gemm_bound")), timed  # none failed
    with tarfile.open(out / "rest.tar.gz") as tar:
        text = tar.extractfile("./2_info.txt").read().decode()
    info = json.loads(text[text.index("{") : text.index("}") + 1])
    assert info["package"] == os.path.dirname(mdkernels.__file__)  # the installed package, not the tree's
    assert sorted(p.name for p in (REPO / "bench" / "results").iterdir()) == before  # nothing into the repo


def _plan(script: str, call: str) -> list[tuple[str, int]]:
    entries = re.search(rf"PLAN_{call}=\((.*?)\)", script, re.S).group(1).split()
    return [(e.split(":")[0], int(e.split(":")[1])) for e in entries]


@pytest.mark.skipif(not GPU_CHECK.exists(), reason="needs the source tree")
def test_gpu_check_fits_the_gpu_machines_limits_before_it_runs(tmp_path):
    """Call 1's step limits add up to at most 450 s and call 2's to 300 s (one command runs at most 10 minutes; 15 of
    device time in all, the machine's start included); every step the script runs is in its plan; and a plan over
    its budget is refused before anything runs."""
    script = GPU_CHECK.read_text()
    plans = {call: _plan(script, call) for call in ("call1", "call2")}
    assert sum(limit for _, limit in plans["call1"]) <= 450 and sum(limit for _, limit in plans["call2"]) <= 300
    assert re.search(r"BUDGET_call1=450\b", script) and re.search(r"BUDGET_call2=300\b", script)
    planned = {name for plan in plans.values() for name, _ in plan}
    used = set(re.findall(r"^\s*step (\w+)", script, re.M))
    assert used == planned, (used ^ planned)
    (tmp_path / "bench").mkdir()
    last = re.compile(r"(PLAN_call1=\([^)]*6d_margin_ce_2M_frozen:)(\d+)")
    over = last.sub(lambda m: m.group(1) + str(int(m.group(2)) + 451), script)
    (tmp_path / "bench" / "gpu_check.sh").write_text(over)
    res = subprocess.run(["bash", str(tmp_path / "bench" / "gpu_check.sh"), "--dry-run"], capture_output=True,
                         text=True, env={**os.environ, "OUT": str(tmp_path / "out")})  # fmt: skip
    assert res.returncode == 2 and "over its 450 s" in res.stderr, res.stderr
    assert not (tmp_path / "out").exists()


def test_gpu_check_runs_python_outside_the_tree():
    """Every Python step of bench/gpu_check.sh (but pip's) runs from a folder holding only a link to bench/
    (``IN``): ``python -m`` puts the working directory first on sys.path, so from the repository root a step would
    import the source tree's mdkernels, which on a fresh checkout has no CUDA module."""
    if not GPU_CHECK.exists():
        pytest.skip("needs the source tree (bench/)")
    lines = [line for line in GPU_CHECK.read_text().splitlines() if "$PY -m" in line and "-m pip" not in line]
    assert len(lines) >= 8 and all("IN[" in line for line in lines), [line for line in lines if "IN[" not in line]


# ---- on a GPU --------------------------------------------------------------------------------------------------
def _gpu_step(backend):
    torch.manual_seed(0)
    head = mdkernels.nn.ArcFace(512, 10_007, backend=backend).cuda()
    net = torch.nn.Linear(256, 512).cuda()
    x = torch.randn(256, 256, device="cuda")
    y = torch.randint(0, 10_007, (256,), device="cuda")
    return head, net, x, y


@pytest.mark.gpu
@pytest.mark.needs_cuda  # sync debug mode, streams, graph replay; on the CPU: test_sync_free.py, with fakes
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_step_without_sync_and_in_a_cuda_graph(backend):
    if backend == "cuda" and not _cuda_ext.usable(torch.empty(1, device="cuda")):
        pytest.skip(f"CUDA module: {_cuda_ext.unusable_reason()}")
    head, net, x, y = _gpu_step(backend)
    head(net(x), y).backward()  # compile and warm up outside the checks
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            head(net(x), y).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            head(net(x), y).backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = head(net(x), y)
        loss.backward()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(loss)


@pytest.mark.gpu
@pytest.mark.needs_cuda  # on the CPU: test_call_makes_the_tensors_gpu_current and the stream-of-device tests
@pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_tensors_on_the_second_gpu(backend):
    torch.cuda.set_device(0)
    x, w, y = make(67, 128, 1017, torch.float32, "cuda:1")
    out = run(mdkernels.margin_cross_entropy, x, w, y, backend=backend)
    ref = run(R.margin_cross_entropy, x.detach().cpu().requires_grad_(), w.detach().cpu().requires_grad_(), y.cpu())
    for a, b in zip(out, ref, strict=True):
        assert a.device == torch.device("cuda:1")
        assert_close(a.cpu(), b, torch.float32)


@pytest.mark.gpu
@pytest.mark.needs_cuda  # TF32 is the GPU's; on the CPU: test_fp32_dots_are_tf32x3_whatever_allow_tf32_says
def test_gpu_fp32_is_near_fp32_with_tf32_allowed(tf32):
    """tf32x3: the fp32 path keeps about 1e-6 on a cosine even with allow_tf32 set (TF32: 1e-3, 0.06 at s=64)."""
    tf32(True)
    x, w, y = make(256, 512, 20_011, torch.float32, "cuda")
    truth = run(R.margin_cross_entropy, x.detach().double().requires_grad_(), w.detach().double().requires_grad_(), y)
    fast = run(mdkernels.margin_cross_entropy, x, w, y, backend="triton")
    for name, f, t in zip(("loss", "dx", "dw"), fast, truth, strict=True):
        rel = ((f.double() - t).norm() / t.norm()).item()
        assert rel < 2e-5, f"{name}: {rel:.2e}"


@needs_triton
def test_the_sharded_head_takes_the_single_heads_16_bit_operands_under_autocast(tmp_path):
    """Under torch.autocast the sharded (Partial FC) head runs the same 16-bit dot operands as the single head,
    not fp32: on one gloo rank its loss and gradients equal the single fused head's under autocast, and differ
    from the fp32 ones."""
    import torch.distributed as dist

    from mdkernels import distributed as mdist

    x, w, y = make(37, 128, 1017, torch.float32, "cpu")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        sharded = mdist.ShardedMarginHead(128, 1017, backend="triton")
        single = mdkernels.nn.ArcFace(128, 1017, backend="triton")
        with torch.no_grad():
            sharded.weight.copy_(w)
            single.weight.copy_(w)

        def step(head, amp):
            xa = x.detach().clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                loss = head(xa, y)
            gx, gw = torch.autograd.grad(loss, (xa, head.weight))
            return loss.detach(), gx, gw

        for a, b, c, what in zip(step(sharded, True), step(single, True), step(single, False), ("loss", "dx", "dW"),
                                 strict=True):  # fmt: skip
            assert a.dtype == torch.float32, what
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, what=what: f"{what}: {m}")
            assert not torch.allclose(a, c, rtol=1e-5, atol=0), f"{what}: the sharded head ignored autocast"
    finally:
        dist.destroy_process_group()


# ---- one precision policy, whatever torch's flags say ---------------------------------------------------------------
_GEMMS = ("aten.mm", "aten.bmm", "aten.addmm", "aten.baddbmm", "aten.matmul", "aten._scaled_mm")


@needs_triton
@pytest.mark.parametrize("op", ["margin_ce", "margin_kd", "margin_distillation"])
def test_the_triton_path_runs_no_torch_gemm(op):
    """Around the Triton kernels (fp32 dots in tf32x3, 16-bit ones exact to their operands) the torch side works on
    (B,) vectors with elementwise products and sums, never a GEMM that ``allow_tf32`` would turn into TF32: the
    probe sees every aten op inside the custom ops."""
    x, w, y = make(37, 64, 301, torch.float32, "cpu")
    t = (x.detach() + 0.1).requires_grad_(False)
    calls = {
        "margin_ce": lambda: mdkernels.margin_cross_entropy(x, w, y, backend="triton"),
        "margin_kd": lambda: mdkernels.margin_kd_loss(x, t, w, y, backend="triton"),
        "margin_distillation": lambda: mdkernels.margin_distillation_loss(x, w.detach(), y, teacher_embeddings=t,
                                                                          backend="triton"),
    }  # fmt: skip
    with probe.watch() as seen:
        calls[op]().backward()
    gemms = [c for c in seen.created if c[0].startswith(_GEMMS)]
    assert seen.created and not gemms, gemms


def test_the_torch_paths_gemms_are_full_fp32_whatever_allow_tf32_says(tf32):
    """The torch backend's chunk GEMMs on a GPU run with TF32 off for their duration (restored after): a fake CUDA
    fp32 tensor stands in (the context reads the tensor's device and dtype only); CPU and 16-bit tensors leave
    the flag alone."""
    from types import SimpleNamespace

    from mdkernels.ops._common.env import ieee_fp32_matmul

    tf32(True)
    with ieee_fp32_matmul(SimpleNamespace(is_cuda=True, dtype=torch.float32)):
        assert torch.backends.cuda.matmul.allow_tf32 is False
    assert torch.backends.cuda.matmul.allow_tf32 is True
    cpu32 = SimpleNamespace(is_cuda=False, dtype=torch.float32)
    gpu16 = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)
    for other in (cpu32, gpu16):
        with ieee_fp32_matmul(other):
            assert torch.backends.cuda.matmul.allow_tf32 is True
    with pytest.raises(RuntimeError), ieee_fp32_matmul(SimpleNamespace(is_cuda=True, dtype=torch.float32)):
        raise RuntimeError("a failing GEMM")
    assert torch.backends.cuda.matmul.allow_tf32 is True  # restored on the way out of an error too


# ---- every GPU test runs on the CPU too, or says why it cannot ----------------------------------------------------
def _marks(decorators) -> set[str]:
    names = set()
    for d in decorators:
        node = d.func if isinstance(d, ast.Call) else d
        text = ast.unparse(node)
        if text.startswith("pytest.mark."):
            names.add(text.removeprefix("pytest.mark."))
    return names


def test_every_gpu_test_runs_on_the_simulated_gpu_or_needs_cuda():
    """A ``gpu`` test either takes the ``gpu`` fixture (on the CPU: the simulated H100, so that a test which would
    fail on the GPU with nothing wrong fails here first) or is marked ``needs_cuda`` (its assertion needs CUDA
    itself; a CPU-side test of its logic with fakes stands beside it). Read from the test files' source: no test
    can slip through by the order of collection hooks."""
    here = Path(__file__).resolve().parent
    gpu_tests, unrouted = [], []
    for path in sorted(here.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        module_marks = set()
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in node.targets):
                values = node.value.elts if isinstance(node.value, ast.List) else [node.value]
                module_marks |= _marks(values)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                marks = module_marks | _marks(node.decorator_list)
                if "gpu" in marks:
                    gpu_tests.append(node.name)
                    if "needs_cuda" not in marks and "gpu" not in [a.arg for a in node.args.args]:
                        unrouted.append(f"{path.name}::{node.name}")
    assert len(gpu_tests) >= 15, gpu_tests  # the parser finds them
    assert not unrouted, f"gpu tests neither on the simulated GPU nor marked needs_cuda: {unrouted}"
    import conftest

    assert not conftest.UNROUTED, conftest.UNROUTED
