"""The CUDA C++ kernels (csrc/), run on the CPU by the emulator in csrc/emu against mdkernels.reference.

CI has nvcc but no GPU: the same kernel source is compiled by the host compiler against
csrc/emu/cuda_emu.h (threads as fibers, real barriers and warp collectives, emulated WMMA with fp32
accumulation), so every CUDA op is checked for values and gradients in each dtype and odd shapes here.
The GPU tests (``-m gpu``) repeat the comparisons on the hardware. The first tests show that the
emulator's own checks fire on kernels with known defects.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, assert_close_to_truth
from test_margin_ce import CONFIGS, check_tiny_gradient_terms, check_zero_rows_fp16, eager_same_dtype, make, run

import mdkernels
from mdkernels import _cuda_ext
from mdkernels import reference as R
from mdkernels.ops._common.margin import margin_target_and_slope
from mdkernels.ops.l2norm import normalize_backward
from mdkernels.ops.margin_ce import cuda_backend

pytestmark = pytest.mark.skipif(_cuda_ext.emu is None, reason="CUDA module (and its emulator) not built")

HALF = [torch.bfloat16, torch.float16]


# ---- the emulator itself ----------------------------------------------------------------------------
def test_emulator_runs_barriers_shuffles_and_wmma_correctly():
    emu = _cuda_ext.emu
    for order in ("forward", "reverse", "shuffle"):
        emu.set_schedule(order, 3)
        assert emu.selftest("rotate") == [float((i + 1) % 128) for i in range(128)], order
    emu.set_schedule("forward", 0)
    assert emu.selftest("warp_sum") == [float(sum(range(32 * i, 32 * i + 32))) for i in range(4)]
    a = torch.tensor([(i * 7) % 11 - 5 for i in range(256)], dtype=torch.float32).view(16, 16)
    b = torch.tensor([(i * 5) % 7 - 3 for i in range(256)], dtype=torch.float32).view(16, 16).T  # col-major
    assert torch.equal(torch.tensor(emu.selftest("wmma_matmul")).view(16, 16), a @ b)


def test_emulator_exposes_a_missing_barrier():
    """The same kernel without its __syncthreads: some schedule reads shared memory before it is written
    (NaN-initialised), so a race cannot pass silently."""
    emu = _cuda_ext.emu
    wrong = []
    for order in ("forward", "reverse", "shuffle"):
        emu.set_schedule(order, 3)
        out = emu.selftest("rotate_without_sync")
        wrong.append(out != [float((i + 1) % 128) for i in range(128)])
    emu.set_schedule("forward", 0)
    assert all(wrong)


@pytest.mark.parametrize(
    "name,message",
    [
        ("divergent_sync", "deadlock"),
        ("early_return", "__syncthreads after 1 threads of the block returned"),
        ("divergent_shuffle", "deadlock"),
        ("misaligned_wmma", "32-byte aligned"),
        ("divergent_wmma", "deadlock"),
        ("too_much_smem", "cudaFuncSetAttribute"),
        ("grid_y_too_large", "65535"),
    ],
)
def test_emulator_reports_defects_as_errors(name, message):
    with pytest.raises(RuntimeError, match=message):
        _cuda_ext.emu.selftest(name)
    _cuda_ext.emu.selftest("rotate")  # and it is usable after the failed launch


def _asan_module():
    try:
        import importlib.util

        return importlib.util.find_spec("mdkernels._cuda_emu_asan")
    except ImportError:
        return None


def _run_under_asan(code: str) -> subprocess.CompletedProcess:
    """Runs ``code`` in a Python with libasan preloaded and mdkernels._cuda_emu_asan as the emulator."""
    libasan = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    env = dict(os.environ, LD_PRELOAD=libasan, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0")
    prelude = "from mdkernels import _cuda_ext, _cuda_emu_asan\n_cuda_ext.emu = _cuda_emu_asan\n"
    return subprocess.run(  # from a neutral folder: the installed package, not a source tree in the cwd
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        env=env,
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
        timeout=600,
    )


needs_asan = pytest.mark.skipif(
    _asan_module() is None and os.environ.get("MDK_EXPECT_CUDA_EXT") != "1",
    reason="the AddressSanitizer emulator is built by CI (MDK_BUILD_EMULATOR_ASAN=1)",
)


@needs_asan
def test_address_sanitizer_catches_an_out_of_bounds_read():
    res = _run_under_asan("_cuda_ext.emu.selftest('out_of_bounds')")
    assert res.returncode != 0 and "heap-buffer-overflow" in res.stderr, res.stderr[-3000:]


@needs_asan
def test_every_cuda_op_stays_in_bounds_under_address_sanitizer():
    """Odd shapes in every dtype through every CUDA op, with ASan watching every host buffer (torch's CPU
    tensors get red zones): a kernel that reads or writes past a row, a tile or a label vector aborts."""
    res = _run_under_asan(
        """
        import torch, mdkernels
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for B, D, C in ((1, 500, 1017), (67, 37, 129), (67, 64, 129)):
                g = torch.Generator().manual_seed(B)
                x = torch.randn(B, D, generator=g).to(dtype).requires_grad_()
                w = torch.randn(C, D, generator=g).to(dtype).requires_grad_()
                y = torch.randint(0, C, (B,), generator=g)
                y[B // 2] = -1
                with _cuda_ext.emulated("shuffle", seed=B):
                    for frozen in (False, True):
                        ww = w.detach() if frozen else w
                        loss = mdkernels.margin_cross_entropy(x, ww, y, backend="cuda", interclass_filter=0.1)
                        torch.autograd.grad(loss, [x] if frozen else [x, w])
                    a = mdkernels.angular_distillation_loss(x, x.detach().flip(0), backend="cuda")
                    torch.autograd.grad(a, x)
                    torch.autograd.grad(mdkernels.l2_normalize(x).sum(), x)
        print("in bounds")
        """
    )
    assert res.returncode == 0 and "in bounds" in res.stdout, res.stderr[-3000:]


def test_emulation_is_scoped():
    x = torch.randn(4, 8)
    assert not _cuda_ext.usable(x)
    with _cuda_ext.emulated():
        assert _cuda_ext.usable(x) and _cuda_ext.ext is _cuda_ext.emu
    assert not _cuda_ext.usable(x)


# ---- l2norm (csrc/l2norm.cu) -----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("rows,dim", [(1, 500), (37, 500), (5, 1000)])
def test_l2norm_kernels(dtype, rows, dim):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, dim, generator=g).to(dtype)
    if dtype == torch.float32:  # a zero row: the eps clamp in both directions (1/eps overflows halves)
        x[0, :] = 0.0
    x.requires_grad_()
    dy = torch.randn(rows, dim, generator=g).to(dtype)
    xd = x.detach().double().requires_grad_()
    truth = F.normalize(xd, dim=1)
    (gtruth,) = torch.autograd.grad(truth, xd, dy.double())
    plain = F.normalize(x, dim=1)
    (gplain,) = torch.autograd.grad(plain, x, dy)
    with _cuda_ext.emulated():
        y = mdkernels.l2_normalize(x)
        (gx,) = torch.autograd.grad(y, x, dy)
        mixed = normalize_backward(x.detach(), dy.float())  # fp32 gradient into x's dtype
    assert y.dtype == dtype and gx.dtype == dtype and mixed.dtype == dtype
    assert_close_to_truth(y, plain, truth, f"{dtype} y")
    assert_close_to_truth(gx, gplain, gtruth, f"{dtype} dx")
    assert_close_to_truth(mixed, gplain, gtruth, f"{dtype} dx from fp32 dy")


# ---- angular distillation (csrc/angular_distill.cu) -------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize("shape,per", [((67, 500), "sample"), ((3, 64, 7, 9), "position")])
@pytest.mark.parametrize("p", [1.0, 2.0])
def test_angular_kernels(dtype, shape, per, p):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(*shape, generator=g).to(dtype).requires_grad_()
    t = torch.randn(*shape, generator=g).to(dtype)
    sd = s.detach().double().requires_grad_()

    def grads(loss, inp):
        return (loss.detach(), *torch.autograd.grad(loss, inp))

    truth = grads(R.angular_distillation_loss(sd, t.double(), p=p, per=per), sd)
    plain = grads(R.angular_distillation_loss(s, t, p=p, per=per), s)
    with _cuda_ext.emulated():
        fast = grads(mdkernels.angular_distillation_loss(s, t, p=p, per=per, backend="cuda"), s)
    for f, pl, tr, name in zip(fast, plain, truth, ("loss", "ds"), strict=True):
        assert_close_to_truth(f, pl, tr, f"emulated cuda angular {dtype} p={p} {name}")


# ---- target logit row kernel (csrc/margin_target.cu) -----------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
@pytest.mark.parametrize(
    "margin",
    [dict(m1=1.0, m3=0.0, fallback=True), dict(m1=1.0, m3=0.2, fallback=False), dict(m1=1.35, m3=0.0, fallback=False)],
    ids=["arcface", "combined", "sphereface"],
)
@pytest.mark.parametrize("grad", ["exact", "straight_through"])
def test_margin_target_row_kernel(dtype, margin, grad):
    """Rows at cos = 1, -1, in the fallback region and random, per-row m2 and m3, an ignored row, D = 500. The raw
    cosine against fp64; z and the slope against the torch path (fp32, what the other backends run) on the
    kernel's own cosines: near c = +-1 acos amplifies a last-bit difference of the dot product by 1e3."""
    g = torch.Generator().manual_seed(2)
    B, D, C = 41, 500, 97
    w = torch.randn(C, D, generator=g).to(dtype)
    y = torch.randint(0, C, (B,), generator=g)
    x = torch.randn(B, D, generator=g).to(dtype)
    x[0], x[1], x[2] = w[y[0]] * 3, -w[y[1]], -w[y[2]] + 0.3 * torch.randn(D, generator=g).to(dtype)
    y[5] = -1
    m2 = torch.linspace(0.1, 0.6, B)
    m3 = torch.linspace(0.1, 0.3, B) if margin["m3"] else torch.zeros(B)  # per row, read on the device
    kw = {k: v for k, v in margin.items() if k != "m3"}
    rx, rw = x.float().norm(dim=1).reciprocal(), w.float().norm(dim=1).reciprocal()
    with _cuda_ext.emulated():
        raw, z, slope = cuda_backend.target_terms(x, w, y, rx, rw, m2, m3, 64.0, grad=grad, **kw)
    valid = y >= 0
    safe = y.clamp_min(0)
    raw_ref = (x.double() * w.double()[safe]).sum(1) * rx.double() * rw.double()[safe]
    z_ref, slope_ref, _ = margin_target_and_slope(raw.clamp(-1, 1), m2, m3=m3, s=64.0, grad=grad, **kw)
    for name, got, want in (("raw", raw, raw_ref), ("z", z, z_ref), ("slope", slope, slope_ref)):
        assert (got[~valid] == 0).all(), name
        torch.testing.assert_close(got[valid].double(), want[valid].double(), rtol=2e-5, atol=2e-5, msg=name)


# ---- fused margin CE (csrc/margin_ce.cu) ------------------------------------------------------------
SHAPE = (67, 500, 1017)  # two row tiles (BM = 64), D not a multiple of BK = 32, C not of BN = 64


@pytest.mark.slow
@pytest.mark.parametrize("config", list(CONFIGS))
def test_margin_ce_fp32_all_margins(config):
    """fp32: the SIMT tile, against the reference in fp32 (the suite's fp32 tolerance)."""
    x, w, y = make(*SHAPE, torch.float32)
    ref = run(R.margin_cross_entropy, x, w, y, **CONFIGS[config])
    with _cuda_ext.emulated():
        out = run(mdkernels.margin_cross_entropy, x, w, y, backend="cuda", **CONFIGS[config])
    for name, a, b in zip(("loss", "dx", "dw"), out, ref, strict=True):
        assert_close(a, b, torch.float32, f"emulated cuda {config} {name}")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_margin_ce_d1024_split_over_the_grid(dtype):
    """D = 1024: each block accumulates 256 columns of D in shared memory (O forward, dW^ backward), so the
    grid splits D in four and every block builds the cosines over all of D; fp32 to the suite's tolerance,
    bf16 within 2x eager's error."""
    x, w, y = make(5, 1024, 130, dtype)
    truth = run(R.margin_cross_entropy, x.double(), w.double(), y)
    with _cuda_ext.emulated():
        fast = run(mdkernels.margin_cross_entropy, x, w, y, backend="cuda")
    if dtype == torch.float32:
        for name, a, b in zip(("loss", "dx", "dw"), fast, run(R.margin_cross_entropy, x, w, y), strict=True):
            assert_close(a, b, torch.float32, f"emulated cuda D=1024 {name}")
    else:
        plain = run(eager_same_dtype, x, w, y)
        for name, f, pl, t in zip(("loss", "dx", "dw"), fast, plain, truth, strict=True):
            close_to_truth(f, pl, t, f"emulated cuda bf16 D=1024 {name}")


def close_to_truth(fast, plain, truth, what):
    """assert_close_to_truth on tensors scaled by the truth's largest entry (its floor is then relative)."""
    scale = truth.abs().max().clamp_min(1e-30)
    assert_close_to_truth(fast.double() / scale, plain.double() / scale, truth / scale, what)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("config", ["arcface", "filter"])
@pytest.mark.parametrize("shape", [(1, 500, 1017), SHAPE, (40, 128, 300)], ids=lambda s: "x".join(map(str, s)))
def test_margin_ce_half_precision_tensor_core_tile(dtype, config, shape):
    """bf16/fp16: the WMMA tiles (D = 128: 16-byte tile loads; D = 500: one element per load). Inputs are
    rounded once; the fused error against the fp64 truth on
    those inputs is at most 2x that of eager PyTorch in the input dtype, for the loss, dx, dW and, on their own,
    the non-target centers' dW (far smaller than the targets': an error there would hide in the max)."""
    x, w, y = make(*shape, dtype, pull=0.5)  # a mild pull: gradients of every class stay well above 0
    truth = run(R.margin_cross_entropy, x.double(), w.double(), y, **CONFIGS[config])
    plain = run(eager_same_dtype, x, w, y, **CONFIGS[config])  # what users run today, in the input dtype
    with _cuda_ext.emulated():
        fast = run(mdkernels.margin_cross_entropy, x, w, y, backend="cuda", **CONFIGS[config])
    assert fast[1].dtype == fast[2].dtype == dtype
    for name, f, p, t in zip(("loss", "dx", "dw"), fast, plain, truth, strict=True):
        close_to_truth(f, p, t, f"emulated cuda {dtype} {config} {name}")
    others = torch.ones(shape[2], dtype=torch.bool)
    others[y[y >= 0]] = False
    close_to_truth(fast[2][others], plain[2][others], truth[2][others], f"{dtype} {config} dw non-target")


@pytest.mark.parametrize(
    "dtype,D,offset",
    [(torch.float32, 37, 0), (torch.float32, 64, 1), (torch.bfloat16, 64, 1), (torch.float16, 72, 3)],
    ids=["fp32-odd-D", "fp32-misaligned", "bf16-misaligned", "fp16-misaligned"],
)
def test_margin_ce_scalar_tile_loads(dtype, D, offset):
    """The scalar tile loads: D not a multiple of the 16-byte vector, or tensors that start off a 16-byte
    boundary (views at an element offset, which the launcher must detect)."""
    x, w, y = make(37, D, 203, dtype)
    x = torch.empty(37 * D + offset, dtype=dtype)[offset:].view(37, D).copy_(x.detach()).requires_grad_()
    w = torch.empty(203 * D + offset, dtype=dtype)[offset:].view(203, D).copy_(w.detach()).requires_grad_()
    assert offset == 0 or x.data_ptr() % 16 != 0
    if dtype == torch.float32:
        ref = run(R.margin_cross_entropy, x, w, y)
        with _cuda_ext.emulated():
            out = run(mdkernels.margin_cross_entropy, x, w, y, backend="cuda")
        for name, a, b in zip(("loss", "dx", "dw"), out, ref, strict=True):
            assert_close(a, b, torch.float32, name)
        return
    truth = run(R.margin_cross_entropy, x.double(), w.double(), y)
    plain = run(eager_same_dtype, x, w, y)
    with _cuda_ext.emulated():
        fast = run(mdkernels.margin_cross_entropy, x, w, y, backend="cuda")
    for name, f, p, t in zip(("loss", "dx", "dw"), fast, plain, truth, strict=True):
        close_to_truth(f, p, t, f"{dtype} {name}")


@pytest.mark.slow
def test_margin_ce_fp16_zero_rows_keep_other_gradients():
    with _cuda_ext.emulated():
        check_zero_rows_fp16("cuda", "cpu")


def test_margin_ce_fp16_backward_keeps_tiny_terms():
    with _cuda_ext.emulated():
        check_tiny_gradient_terms("cuda", "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["reverse", "shuffle"])
def test_margin_ce_under_other_thread_orders(schedule):
    """A missing barrier in the tiles would give different values under another order of the threads
    (two row tiles, three D chunks, a partial class tile)."""
    x, w, y = make(67, 96, 300, torch.bfloat16)
    with _cuda_ext.emulated():
        first = run(mdkernels.margin_cross_entropy, x, w, y, backend="cuda")
    with _cuda_ext.emulated(schedule, seed=11):
        other = run(mdkernels.margin_cross_entropy, x, w, y, backend="cuda")
    for a, b in zip(first, other, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # fp32 atomics: only the summation order moves


def test_margin_ce_frozen_centers_per_row_margins_and_weights():
    """Frozen centers skip dW; per-row m2 and a 'none' reduction with per-row weights reach the kernel's
    gradient scale (rows of weight 0 are skipped by the backward's tile test)."""
    x, w, y = make(*SHAPE, torch.float32)
    w = w.detach()
    m2 = torch.linspace(0.1, 0.6, SHAPE[0])
    weights = torch.rand(SHAPE[0])
    weights[:64] = 0.0  # the whole first row tile carries no gradient

    def loss_of(f, **kw):
        return (f(x, w, y, m2=m2, reduction="none", **kw) * weights).sum()

    ref_loss = loss_of(R.margin_cross_entropy)
    (ref_dx,) = torch.autograd.grad(ref_loss, x)
    with _cuda_ext.emulated():
        loss = loss_of(mdkernels.margin_cross_entropy, backend="cuda")
        (dx,) = torch.autograd.grad(loss, x)
    assert_close(loss.detach(), ref_loss.detach(), torch.float32, "loss")
    assert_close(dx, ref_dx, torch.float32, "dx")


def test_margin_ce_large_margin_stays_finite():
    x, w, y = make(9, 64, 300, torch.float32, ignore=False)
    kw = dict(s=64.0, m1=4.0, m2=0.0, fallback=False)
    ref = run(R.margin_cross_entropy, x, w, y, **kw)
    with _cuda_ext.emulated():
        out = run(mdkernels.margin_cross_entropy, x, w, y, backend="cuda", **kw)
    for a, b in zip(out, ref, strict=True):
        assert torch.isfinite(a).all()
        assert_close(a, b, torch.float32, "m1=4")


# ---- a few training steps through the drop-in modules ---------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_steps_with_the_cuda_backend_follow_the_torch_backend(dtype):
    """nn.ArcFace(backend="cuda") behind a small backbone, 6 SGD steps with momentum, plus a MarginDistillation
    term against frozen teacher centers: the loss curve and final weights follow backend="torch" (custom ops, autograd,
    parameter updates and the CUDA kernels together)."""

    def train(backend):
        torch.manual_seed(0)
        body = torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.PReLU(), torch.nn.Linear(96, 64)).to(dtype)
        head = mdkernels.nn.ArcFace(64, 203, backend=backend).to(dtype)
        teacher_centers = torch.randn(203, 64).to(dtype)
        opt = torch.optim.SGD([*body.parameters(), *head.parameters()], lr=0.1, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(6):
            x = torch.randn(70, 48, generator=g).to(dtype)
            y = torch.randint(0, 203, (70,), generator=g)
            t = teacher_centers[y] + 0.3 * torch.randn(70, 64, generator=g).to(dtype)
            emb = body(x)
            loss = head(emb, y) + 0.5 * mdkernels.margin_distillation_loss(
                emb, teacher_centers, y, teacher_embeddings=t, backend=backend
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        return losses, head.weight.detach().float(), body[0].weight.detach().float()

    with _cuda_ext.emulated():
        fast = train("cuda")
    plain = train("torch")
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(torch.tensor(fast[0]), torch.tensor(plain[0]), rtol=tol, atol=tol)
    for a, b in zip(fast[1:], plain[1:], strict=True):
        assert ((a - b).norm() / b.norm()).item() < tol
