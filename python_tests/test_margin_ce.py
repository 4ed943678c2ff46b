"""Fused margin cross-entropy (torch and Triton backends) against mdkernels.reference."""

from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch
from conftest import (
    FUSED_BACKENDS,
    HAS_CUDA,
    LargestAllocation,
    assert_close,
    assert_close_to_truth,
    device_for,
    gpu_backends,
    gpu_classes,
    make,
)
from torch.utils._python_dispatch import TorchDispatchMode

import mdkernels
from mdkernels import reference as R
from mdkernels.ops import margin_ce as mce

CONFIGS = {
    "arcface": dict(m2=0.5),
    "arcface_literal": dict(m2=0.5, fallback=False),
    "cosface": dict(m1=1.0, m2=0.0, m3=0.35),
    "sphereface": dict(m1=1.35, m2=0.0),
    "combined": dict(m1=1.0, m2=0.3, m3=0.2),
    "straight_through": dict(m2=0.5, grad="straight_through"),
    "filter": dict(m2=0.5, interclass_filter=0.05),
}
SHAPES = [(1, 500, 1017), (37, 500, 1017), (64, 64, 300)]  # (B, D, C): odd D and C, B = 1


def run(fn, x, w, y, **kw):
    loss = fn(x, w, y, **kw)
    gx, gw = torch.autograd.grad(loss.sum(), (x, w))
    return loss.detach(), gx, gw


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(backend, dtype, config, shape):
    kw = CONFIGS[config]
    x, w, y = make(*shape, dtype, device_for(backend))
    ref = run(R.margin_cross_entropy, x, w, y, **kw)
    out = run(mdkernels.margin_cross_entropy, x, w, y, backend=backend, **kw)
    for name, a, b in zip(("loss", "d_embeddings", "d_centers"), out, ref, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert_close(a, b, dtype, f"{config} {name}")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_per_row_margin_and_reductions(backend, reduction):
    x, w, y = make(19, 500, 1017, torch.float64, device_for(backend))
    m2 = torch.linspace(0.1, 0.6, 19, dtype=torch.float64, device=x.device)
    weights = torch.rand(19, dtype=torch.float64, device=x.device)  # exercises grad_output of 'none'

    def fn(f, **extra):
        loss = f(x, w, y, m2=m2, reduction=reduction, fallback=False, **extra)
        return loss * weights if reduction == "none" else loss

    ref = run(lambda x, w, y, **k: fn(R.margin_cross_entropy), x, w, y)
    out = run(lambda x, w, y, **k: fn(mdkernels.margin_cross_entropy, backend=backend), x, w, y)
    for a, b in zip(out, ref, strict=True):
        assert_close(a, b, torch.float64, reduction)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_all_rows_ignored(backend):
    x, w, _ = make(5, 64, 300, torch.float32, device_for(backend))
    y = torch.full((5,), -1, device=x.device)
    loss, gx, gw = run(mdkernels.margin_cross_entropy, x, w, y, backend=backend)
    assert loss.item() == 0.0 and torch.all(gx == 0) and torch.all(gw == 0)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_custom_ignore_index(backend):
    x, w, y = make(9, 64, 300, torch.float64, device_for(backend), ignore=False)
    y[3] = 999
    ref = run(R.margin_cross_entropy, x, w, y, ignore_index=999)
    out = run(mdkernels.margin_cross_entropy, x, w, y, ignore_index=999, backend=backend)
    for a, b in zip(out, ref, strict=True):
        assert_close(a, b, torch.float64, "ignore_index=999")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_stats(backend):
    x, w, y = make(11, 500, 1017, torch.float64, device_for(backend))
    loss, stats = mdkernels.margin_cross_entropy(x, w, y, backend=backend, return_stats=True)
    logits, z_t, valid = R.margin_logits(x, w, y)
    assert_close(stats.lse[valid], torch.logsumexp(logits, 1)[valid].detach(), torch.float64, "lse")
    cos = R.normalize(x) @ R.normalize(w).T
    safe = y.clamp_min(0)
    assert_close(stats.cos_target[valid], cos[valid, safe[valid]].detach(), torch.float64, "cos_target")
    assert_close(stats.loss_rows, R.margin_cross_entropy(x, w, y, reduction="none").detach(), torch.float64, "rows")
    assert not stats.lse.requires_grad


class _CountMatmuls(TorchDispatchMode):
    """Counts the 2-D matrix products (``mm``, ``addmm(_)``, ``mv``) aten runs while active: the GEMMs over
    classes. (``bmm`` of the row-wise dots in the normalisation backward is a batch of vector dots.)"""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_, torch.ops.aten.mv):
            self.count += 1
        return func(*args, **(kwargs or {}))


def op_pair(x, w, y, backend, need_dx=True, need_dw=True, probe_forward=None, probe_backward=None):
    """The op's forward and backward implementations called directly (a dispatch mode sees the aten ops
    inside them; around the custom op it would see the op alone), each inside its probe when given."""
    x, w = x.detach(), w.detach()
    cd = torch.float64 if x.dtype == torch.float64 else torch.float32
    m2 = torch.full((x.shape[0],), 0.5, dtype=cd, device=x.device)
    m3 = torch.zeros(x.shape[0], dtype=cd, device=x.device)
    # s, m1, fallback, grad, easy_margin, theta_clip, cos_clamp, interclass_filter, subcenters, ignore_index
    args = (64.0, 1.0, True, "exact", False, None, 1.0, None, 1, -1)
    with probe_forward or contextlib.nullcontext():
        loss_rows, lse, _, rx, rw, o_bar, kt = mce.forward_impl(x, w, y, m2, m3, None, *args, need_dx, backend)
    if not (need_dx or need_dw):
        return loss_rows
    with probe_backward or contextlib.nullcontext():
        return mce.backward_impl(torch.ones_like(lse), x, w, y, m2, m3, None, lse, rx, rw, o_bar, kt, *args, need_dx,
                                 need_dw, False, backend)  # fmt: skip


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_frozen_centers_run_no_gemm_in_the_backward(backend, monkeypatch):
    """Frozen centers: the backward never reaches the center-gradient pass (every backend), and the torch
    path's backward runs no matrix product at all; dx comes from the forward's accumulator."""
    x, w, y = make(13, 500, 1017, torch.float64, device_for(backend))
    w = w.detach()
    module = mce.BACKENDS[backend]
    monkeypatch.setattr(module, "center_grad", lambda *a: pytest.fail("center_grad ran for frozen centers"))
    loss = mdkernels.margin_cross_entropy(x, w, y, backend=backend)
    (gx,) = torch.autograd.grad(loss, x)
    if backend == "torch":
        products = _CountMatmuls()
        op_pair(x, w, y, backend, need_dw=False, probe_backward=products)
        assert products.count == 0
    ref = R.margin_cross_entropy(x, w, y)
    assert_close(gx, torch.autograd.grad(ref, x)[0], torch.float64, "dx with frozen centers")


@pytest.mark.slow
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("resident", [None, 128], ids=["d1024", "d500-split"])
def test_d_split_over_the_grid(backend, resident, monkeypatch):
    """D beyond what a program keeps resident: the Triton kernels split D over the grid (each program owns a
    block of columns and builds the cosines over all of D). D = 1024 splits at the default; at D = 500 a
    resident limit of 128 forces four column blocks, for the forward's accumulator and for dW."""
    if resident is not None:
        from mdkernels.ops._common import tiles

        monkeypatch.setitem(tiles._INTERPRET, "full_d", resident)
        monkeypatch.setitem(tiles._INTERPRET, "split_do", resident)
    D = 1024 if resident is None else 500
    x, w, y = make(5, D, 300, torch.float64, device_for(backend))
    ref = run(R.margin_cross_entropy, x, w, y, interclass_filter=0.1)
    out = run(mdkernels.margin_cross_entropy, x, w, y, backend=backend, interclass_filter=0.1)
    for name, a, b in zip(("loss", "dx", "dw"), out, ref, strict=True):
        assert_close(a, b, torch.float64, f"D={D} {name}")


@pytest.mark.parametrize("fused", [False, True], ids=["torch-passes", "cpp-epilogue"])
def test_gemms_per_step_in_the_torch_path(fused, monkeypatch):
    """The structure the design promises (torch path, one matrix product per class chunk and pass): a
    forward without gradient is one GEMM per chunk, with a gradient two (the accumulator), the backward of
    trainable centers two more (logits again, then dW) and nothing for dx."""
    B, D, C = 1024, 8, 3000
    chunk = mdkernels.ops._common.chunked.chunk_size(B, C)
    chunks = -(-C // chunk)
    if fused and mdkernels.ops._common.chunked.cpu_ext is None:
        pytest.skip("the CPU module (mdkernels._cpu) is not built")
    monkeypatch.setattr(mdkernels.ops._common.chunked, "USE_CPU_EXT", fused)
    x, w, y = make(B, D, C, torch.float64, ignore=False)
    fwd_only, fwd, bwd = _CountMatmuls(), _CountMatmuls(), _CountMatmuls()
    op_pair(x, w, y, "torch", need_dx=False, need_dw=False, probe_forward=fwd_only)
    op_pair(x, w, y, "torch", probe_forward=fwd, probe_backward=bwd)
    # the torch passes also run one mv per backward chunk (the per-class dot of the normalisation backward),
    # which the C++ epilogue forms in its sweep
    per_bwd_chunk = 2 if fused else 3
    assert chunks >= 3 and (fwd_only.count, fwd.count, bwd.count) == (chunks, 2 * chunks, per_bwd_chunk * chunks)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("config", ["arcface", "sphereface", "filter"])
def test_gradcheck(backend, config):
    x, w, y = make(3, 5, 7, torch.float64, device_for(backend), ignore=False)
    kw = dict(CONFIGS[config], s=4.0)
    fn = lambda x, w: mdkernels.margin_cross_entropy(x, w, y, backend=backend, **kw)
    # the interpreter pays per launch: Triton checks random projections of the Jacobian (fast mode)
    inputs = (x.detach().requires_grad_(), w.detach().requires_grad_())
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_non_contiguous_inputs(backend):
    x, w, y = make(8, 128, 301, torch.float64, device_for(backend))
    xs = torch.stack([x.detach(), torch.zeros_like(x)], 2).flatten(1)[:, ::2].requires_grad_()  # column stride 2
    assert torch.equal(xs, x)
    wt = w.detach().T.contiguous().T.requires_grad_()  # a transposed view
    assert not xs.is_contiguous() and not wt.is_contiguous()
    out = run(mdkernels.margin_cross_entropy, xs, wt, y, backend=backend)
    ref = run(R.margin_cross_entropy, x.detach().requires_grad_(), w.detach().requires_grad_(), y)
    for a, b in zip(out, ref, strict=True):
        assert_close(a, b, torch.float64, "non-contiguous")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_opcheck(backend):
    x, w, y = make(6, 40, 50, torch.float32, device_for(backend))
    m2 = torch.full((6,), 0.5, device=x.device)
    for need_dx, op_dtype in ((True, ""), (False, ""), (True, "bfloat16")):  # op_dtype: autocast's operands
        xx = x if need_dx else x.detach()  # without need_dx, the embeddings must not need a gradient
        m3 = torch.full((6,), 0.1, device=x.device)
        args = (xx, w, y, m2, m3, None, 16.0, 1.0, True, "exact", False, None, 1.0, None, 1, -1, need_dx, backend,
                op_dtype)  # fmt: skip
        torch.library.opcheck(mce.margin_ce_forward, args)


def test_torch_compile_fullgraph():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(16, 32)
            self.head = mdkernels.nn.ArcFace(32, 101, backend="torch")

        def forward(self, x, y):
            return self.head(torch.relu(self.body(x)), y)

    torch.manual_seed(0)
    net = Net().double()
    x, y = torch.randn(8, 16, dtype=torch.float64), torch.randint(0, 101, (8,))
    eager = net(x, y)
    eager.backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    loss = compiled(x, y)
    loss.backward()
    assert loss.item() == pytest.approx(eager.item(), rel=1e-12)
    for p, g in zip(net.parameters(), grads, strict=True):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.slow
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("need_dw", [True, False])
def test_no_batch_by_classes_allocation(backend, need_dw):
    """The memory contract: nothing of B x C elements in forward or backward (here C*D << B*C)."""
    B, D, C = 128, 16, 200_000 if backend == "torch" else 20_000
    dev = device_for(backend)
    x, w, y = (t.detach() for t in make(B, D, C, torch.float32, dev))
    mode = LargestAllocation()
    op_pair(x, w, y, backend, need_dw=need_dw, probe_forward=mode, probe_backward=mode)
    limit = max(C * D if need_dw else B * D, B * C // 16)
    assert 0 < mode.largest <= limit, f"largest allocation {mode.largest} elements, B*C = {B * C}"


class _LargeAllocations(TorchDispatchMode):
    """Records (elements, dtype) of every floating tensor of at least ``floor`` elements aten produces."""

    def __init__(self, floor):
        super().__init__()
        self.floor, self.seen = floor, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is not torch.ops.aten.set_:  # the interpreter re-viewing argument storage
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() >= self.floor:
                    self.seen.append((t.numel(), t.dtype))
        return out


@pytest.mark.slow
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_backward_allocates_no_center_sized_scratch(backend, dtype):
    """The center gradient is written once, in the centers' dtype: the backward allocates nothing of C x D
    elements but the returned gradient (no fp32 scratch of the centers' size for bf16 centers), and nothing
    of B x C in either direction."""
    B, D, C = 64, 16, 200_000 if backend == "torch" else 20_000  # the torch path's chunks hold 16384 classes
    x, w, y = make(B, D, C, dtype, device_for(backend))
    center_sized = _LargeAllocations(C * D // 2)
    op_pair(x, w, y, backend, probe_backward=center_sized)
    assert center_sized.seen == [(C * D, dtype)], center_sized.seen
    forward, backward = _LargeAllocations(B * C // 4), _LargeAllocations(B * C // 4)
    op_pair(x, w, y, backend, probe_forward=forward, probe_backward=backward)
    assert not forward.seen and backward.seen == [(C * D, dtype)], f"B*C = {B * C}: {forward.seen} {backward.seen}"


def test_bad_input_through_the_fused_api():
    x, w, y = make(4, 8, 10, torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        mdkernels.margin_cross_entropy(x, w, y, backend="cudnn")
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        mdkernels.margin_cross_entropy(x, w, torch.tensor([0, 1, 10, 2]), backend="torch")
    bad = x.detach().clone()
    bad[1, 2] = math.nan
    with pytest.raises(ValueError, match="embeddings contains NaN"):
        mdkernels.margin_cross_entropy(bad, w, y, check_finite=True)
    with pytest.raises(ValueError, match="at least one row"):
        mdkernels.margin_cross_entropy(x, w[:0], y)
    with pytest.raises(ValueError, match="return_stats"):
        mdkernels.margin_cross_entropy(x, w, y, backend="reference", return_stats=True)
    with pytest.warns(UserWarning, match="not monotone"):
        mdkernels.margin_cross_entropy(x, w, y, m2=0.5, fallback=False, backend="torch")


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only error")
def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    """Outside the interpreter, Triton cannot take CPU tensors: a ValueError saying what to do instead."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, mdkernels\n"
        "x, w, y = torch.randn(4, 8), torch.randn(10, 8), torch.tensor([0, 1, 2, 3])\n"
        "try:\n"
        "    mdkernels.margin_cross_entropy(x, w, y, backend='triton')\n"
        "except (ValueError, RuntimeError) as err:\n"
        "    print('RAISED', err)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "RAISED" in out.stdout and "triton" in out.stdout.lower(), out.stdout + out.stderr[-2000:]


# --- GPU: low precision against the fp64 truth, 2x plain PyTorch's error ---------------------------------
def eager_same_dtype(x, w, y, *, s=64.0, m1=1.0, m2=0.5, m3=0.0, fallback=True, grad="exact", interclass_filter=None):
    """What users run today, entirely in the input dtype: normalise, F.linear, margin, cross-entropy."""
    cos = torch.nn.functional.linear(torch.nn.functional.normalize(x), torch.nn.functional.normalize(w))
    cos = cos.clamp(-1, 1)
    valid = y != -1
    safe = y.clamp_min(0)
    ct = cos.gather(1, safe[:, None]).squeeze(1)
    g = R.margin_target(ct, m1=m1, m2=m2, m3=m3, fallback=fallback, grad=grad)
    if interclass_filter is not None:
        hot = torch.nn.functional.one_hot(safe, w.shape[0]).bool()
        cos = torch.where((cos > interclass_filter) & ~hot, torch.zeros_like(cos), cos)
    logits = torch.where(torch.nn.functional.one_hot(safe, w.shape[0]).bool(), g[:, None], cos) * s
    return torch.nn.functional.cross_entropy(logits[valid], y[valid])


GPU_BACKENDS = gpu_backends("triton", "torch", "cuda")


# On the simulated GPU the configs whose kernels differ (CosFace's margin is the target's, outside the kernels)
GPU_CONFIGS = ["arcface", "cosface", "filter", "straight_through"] if HAS_CUDA else ["arcface", "filter"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("config", GPU_CONFIGS)
def test_gpu_low_precision(backend, dtype, config, gpu):
    kw = CONFIGS[config]
    x, w, y = make(67, 500, gpu_classes(4099), dtype, gpu)
    truth = run(
        R.margin_cross_entropy, x.detach().double().requires_grad_(), w.detach().double().requires_grad_(), y, **kw
    )
    plain = run(eager_same_dtype, x, w, y, **kw)
    fast = run(mdkernels.margin_cross_entropy, x, w, y, backend=backend, **kw)
    for name, f, p, t in zip(("loss", "dx", "dw"), fast, plain, truth, strict=True):
        assert f.shape == t.shape
        assert_close_to_truth(f, p, t, f"{config} {dtype} {name}")


def check_tiny_gradient_terms(backend, device):
    """fp16 with a row weight of 1e-8 (a mean over a huge batch, a small loss weight, no loss scaling):
    every G = dL/dc entry, ~6e-8, is at fp16's smallest subnormal, yet dW is well inside fp16's range,
    because the centers are short (|w| ~ 4e-4: dW carries 1/|w|). The center-gradient kernels form
    G / max|gr| as their fp16 operand and scale the fp32 sums back; with G itself, dW would be flushed."""
    g = torch.Generator().manual_seed(3)
    B, D, C = 67, 16, 8
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    w = 1e-4 * torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    x16, w16 = (t.to(device, torch.float16).requires_grad_() for t in (x, w))
    x64, w64 = (t.detach().double().requires_grad_() for t in (x16, w16))
    weight = torch.tensor(1e-8, dtype=torch.float64)
    truth = torch.autograd.grad(R.margin_cross_entropy(x64, w64, y.to(device), reduction="sum"), w64, weight)[0]
    loss = mdkernels.margin_cross_entropy(x16, w16, y.to(device), reduction="sum", backend=backend)
    (dw,) = torch.autograd.grad(loss, w16, weight.float().to(device))
    assert truth.abs().max() > 1e-3  # representable in fp16, far above its subnormals
    rel = ((dw.double() - truth).norm() / truth.norm()).item()
    assert rel < 1e-2, f"dW: relative error {rel:.2e} (tiny gradient terms flushed?)"


def check_zero_rows_fp16(backend, device):
    """fp16 with an ignored all-zero embedding and an all-zero center (1/|row| = 1e12): the other rows'
    and centers' gradients must survive (an operand scaled by 1/|row| would overflow or flush them)."""
    x, w, y = make(67, 500, 1017, torch.float16, device, pull=0.5)
    with torch.no_grad():
        x[33] = 0.0  # make() ignores row B // 2 = 33
        zero_class = int(torch.tensor([c for c in range(1017) if c not in set(y.tolist())][0]))
        w[zero_class] = 0.0
    xf, wf = (t.detach().float().requires_grad_() for t in (x, w))
    ref = run(R.margin_cross_entropy, xf, wf, y)
    out = run(mdkernels.margin_cross_entropy, x, w, y, backend=backend)
    others = torch.arange(1017, device=device) != zero_class  # its own gradient is ~1e12-scaled: no fp16
    for name, a, b in zip(("loss", "dx", "dw"), out, (ref[0], ref[1], ref[2]), strict=True):
        if name == "dw":
            a, b = a[others], b[others]
        assert torch.isfinite(a).all(), name
        rel = ((a.float() - b).norm() / b.norm()).item()
        assert rel < 5e-3, f"{name}: relative error {rel:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends("triton", "cuda"))
def test_gpu_fp16_zero_rows_keep_other_gradients(backend, gpu):
    check_zero_rows_fp16(backend, gpu)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", gpu_backends("triton", "cuda"))
def test_gpu_fp16_backward_keeps_tiny_gradient_terms(backend, tf32, gpu):
    tf32(False)
    check_tiny_gradient_terms(backend, gpu)


@pytest.mark.gpu
@pytest.mark.needs_cuda  # 100,003 classes: the size is the point; split-C at 132 SMs runs simulated in the tests above
def test_gpu_large_classes_bf16_runs_and_matches_fp32():
    x, w, y = make(256, 512, 100_003, torch.bfloat16, "cuda")
    out = run(mdkernels.margin_cross_entropy, x, w, y, backend="triton")
    ref = run(
        mdkernels.margin_cross_entropy,
        x.detach().float().requires_grad_(),
        w.detach().float().requires_grad_(),
        y,
        backend="torch",
    )
    assert abs(out[0].item() - ref[0].item()) < 2e-2 * max(1.0, abs(ref[0].item()))
    for a, b in zip(out[1:], ref[1:], strict=True):
        assert torch.isfinite(a).all()
        rel = (a.float() - b).norm() / b.norm()
        assert rel < 2e-2


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_large_margin_does_not_overflow_into_nan(backend):
    """The un-margined target logit can exceed the logsumexp by far (m1=4, s=64, no fallback): masked
    entries must never reach exp (inf * 0 = NaN)."""
    x, w, y = make(9, 64, 300, torch.float64, device_for(backend), ignore=False)
    kw = dict(s=64.0, m1=4.0, m2=0.0, fallback=False)
    ref = run(R.margin_cross_entropy, x, w, y, **kw)
    out = run(mdkernels.margin_cross_entropy, x, w, y, backend=backend, **kw)
    for a, b in zip(out, ref, strict=True):
        assert torch.isfinite(a).all()
        assert_close(a, b, torch.float64, "m1=4")


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_backends("cuda"), reason="CUDA module (or, on the CPU, its emulator) not built")
@pytest.mark.parametrize("config", list(CONFIGS) if HAS_CUDA else ["arcface", "filter", "straight_through"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_backend_fp32_matches_reference(config, shape, tf32, gpu):
    tf32(False)
    x, w, y = make(*shape, torch.float32, gpu)
    ref = run(R.margin_cross_entropy, x, w, y, **CONFIGS[config])
    out = run(mdkernels.margin_cross_entropy, x, w, y, backend="cuda", **CONFIGS[config])
    for name, a, b in zip(("loss", "dx", "dw"), out, ref, strict=True):
        assert_close(a, b, torch.float32, f"cuda {config} {name}")


def test_cuda_backend_needs_cuda_tensors():
    x, w, y = make(4, 8, 10, torch.float32)
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA"):
        mdkernels.margin_cross_entropy(x, w, y, backend="cuda")


def test_torch_compile_fullgraph_inductor():
    """The default backend too (generates C++ on the CPU): the custom ops stay opaque inside the graph."""
    torch.manual_seed(0)
    body = torch.nn.Linear(16, 32)
    head = mdkernels.nn.ArcFace(32, 101, backend="torch")
    x, y = torch.randn(8, 16), torch.randint(0, 101, (8,))
    step = lambda x, y: head(torch.relu(body(x)), y)
    eager = step(x, y)
    grads = torch.autograd.grad(eager, [body.weight, head.weight])
    loss = torch.compile(step, fullgraph=True)(x, y)
    assert loss.item() == pytest.approx(eager.item(), rel=1e-5)
    for a, b in zip(torch.autograd.grad(loss, [body.weight, head.weight]), grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(
    mdkernels.ops._common.chunked.cpu_ext is None, reason="the CPU module (mdkernels._cpu) is not built"
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("config", ["arcface", "filter", "straight_through"])
def test_cpu_epilogue_matches_the_torch_passes(dtype, config, monkeypatch):
    """The C++ chunk epilogues (csrc/cpu) against the pure-torch passes they replace, both against the
    reference: several chunks, targets in the first and last column of a chunk, an ignored row, rows at
    cos = +-1 (the clamp), C not a multiple of the chunk."""
    from mdkernels.ops._common import chunked

    B, D = 1024, 24
    n = chunked.chunk_size(B, 10**6)  # classes per chunk
    C = 3 * n + 17
    x, w, y = make(B, D, C, dtype)
    with torch.no_grad():
        y[:4] = torch.tensor([0, n - 1, n, C - 1])
        x[5], x[6] = w[y[5]] * 3, -w[y[6] + 1 if y[6] + 1 < C else 0]  # cos = +1 to the target, -1 to another
    ref = run(R.margin_cross_entropy, x, w, y, **CONFIGS[config])
    results = {}
    for fused in (True, False):
        monkeypatch.setattr(chunked, "USE_CPU_EXT", fused)
        assert chunked.fused_epilogue(x) == fused
        results[fused] = run(mdkernels.margin_cross_entropy, x, w, y, backend="torch", **CONFIGS[config])
    for name, a, b, r in zip(("loss", "dx", "dw"), results[True], results[False], ref, strict=True):
        assert_close(a, r, dtype, f"C++ epilogue {config} {name}")
        assert_close(b, r, dtype, f"torch passes {config} {name}")


@pytest.mark.skipif(os.environ.get("MDK_EXPECT_CUDA_EXT") != "1", reason="set by CI, where the C++ modules build")
def test_cpu_module_was_built():
    assert mdkernels.ops._common.chunked.cpu_ext is not None, "the CPU module (mdkernels._cpu) is missing"


needs_cpu_ext = pytest.mark.skipif(
    mdkernels.ops._common.chunked.cpu_ext is None, reason="the CPU module (mdkernels._cpu) is not built"
)


@pytest.mark.slow
@needs_cpu_ext
def test_cpu_epilogue_default_target_build():
    """The default-target build of the C++ epilogues (what a CPU without AVX2 runs), forced with
    MDK_CPU_ISA=base in a fresh interpreter, against the reference in fp32."""
    import subprocess
    import sys
    import tempfile
    import textwrap

    code = textwrap.dedent(
        """
        import torch, mdkernels
        from mdkernels import reference as R
        from mdkernels.ops._common import chunked
        assert chunked.cpu_ext.isa == "base", chunked.cpu_ext.isa
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(300, 40, generator=g), torch.randn(2000, 40, generator=g)
        y = torch.randint(0, 2000, (300,), generator=g)
        for kw in ({}, {"interclass_filter": 0.1}):
            xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
            xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
            a = mdkernels.margin_cross_entropy(xa, wa, y, backend="torch", **kw)
            b = R.margin_cross_entropy(xb, wb, y, **kw)
            a.backward(); b.backward()
            for u, v in ((a, b), (xa.grad, xb.grad), (wa.grad, wb.grad)):
                torch.testing.assert_close(u, v, rtol=2e-5, atol=2e-5 * float(v.abs().max().clamp_min(1)))
        print("base ok")
        """
    )
    # cwd outside the tree: the child must import the package under test (installed in CI), not the sources
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tempfile.gettempdir(),
                         env=dict(os.environ, MDK_CPU_ISA="base"))  # fmt: skip
    assert res.returncode == 0 and "base ok" in res.stdout, res.stderr[-3000:]


@needs_cpu_ext
def test_cpu_sweeps_same_bits_on_any_team():
    """The C++ sweeps run on the OpenMP team torch's operations use (found at import), else on std::thread; a team
    smaller than the parts asked for (OMP_THREAD_LIMIT=1) walks all of them. Each of the three, in a fresh
    interpreter with 3 parts on this machine's cores, gives the same bits for the forward sweep, the center-gradient
    sweep (its per-part column sums) and the top-k."""
    import subprocess
    import sys
    import tempfile
    import textwrap

    code = textwrap.dedent(
        """
        import sys, torch
        from mdkernels.ops._common import chunked
        ext = chunked.cpu_ext
        g = torch.Generator().manual_seed(0)
        B, n = 203, 777
        z0 = torch.randn(B, n, generator=g) * 10
        rw = torch.rand(n, generator=g) * 0.1 + 0.05
        tgt = torch.randint(-1, n, (B,), generator=g)
        m, l, alpha = torch.full((B,), -1e30), torch.zeros(B), torch.empty(B)
        zf = z0.clone()
        ext.forward_rows(False, zf.data_ptr(), rw.data_ptr(), tgt.data_ptr(), B, n, 64.0, 0.0, False, m.data_ptr(),
                         l.data_ptr(), alpha.data_ptr(), True, 3)
        lse, gr = torch.full((B,), 50.0), torch.rand(B, generator=g)
        te, rt, dot = torch.rand(B, generator=g), torch.rand(B, generator=g), torch.empty(n)
        zb = z0.clone()
        ext.center_grad_rows(False, zb.data_ptr(), rw.data_ptr(), tgt.data_ptr(), B, n, 64.0, 0.0, False,
                             lse.data_ptr(), gr.data_ptr(), te.data_ptr(), rt.data_ptr(), dot.data_ptr(), 3)
        k = 5
        vals, idx = torch.full((B, k), -float("inf")), torch.full((B, k), -1, dtype=torch.int64)
        ext.topk_rows(False, z0.data_ptr(), rw.data_ptr(), 0, B, n, k, vals.data_ptr(), idx.data_ptr(), 3)
        torch.save({"threads": ext.threads, "out": [zf, m, l, alpha, zb, dot, vals, idx]}, sys.argv[1])
        """
    )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"openmp": {}, "team of 1": {"OMP_THREAD_LIMIT": "1"}, "std": {"MDK_CPU_THREADS": "std"}}
        for name, extra in runs.items():
            path = os.path.join(tmp, name.replace(" ", "_") + ".pt")
            env = {k: v for k, v in os.environ.items() if k != "MDK_CPU_THREADS"}
            res = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, cwd=tmp,
                                 env={**env, **extra})  # fmt: skip
            assert res.returncode == 0, res.stderr[-3000:]
            results[name] = torch.load(path)
    assert results["std"]["threads"] == "std::thread"
    if "ATen parallel backend: OpenMP" in torch.__config__.parallel_info():
        assert results["openmp"]["threads"].startswith("openmp "), results["openmp"]["threads"]
    ref = results["std"]["out"]
    assert torch.isfinite(ref[5]).all() and ref[7].min() >= 0  # the sweeps ran: finite sums, every top-k filled
    for name in ("openmp", "team of 1"):
        for a, b in zip(results[name]["out"], ref, strict=True):
            assert torch.equal(a, b), name
