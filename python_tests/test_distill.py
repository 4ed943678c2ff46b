"""Fused distillation losses against mdkernels.reference: values, gradients, memory, bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import FUSED_BACKENDS, assert_close, device_for
from test_margin_ce import _LargestAllocation, make

import mdkernels
from mdkernels import reference as R
from mdkernels.ops import margin_ce as mce
from mdkernels.ops import margin_kd as mkd

SHAPES = [(1, 500, 1017), (37, 500, 1017)]
DTYPES = [torch.float64, torch.float32]


def grads(loss, *inputs):
    return (loss.detach(), *torch.autograd.grad(loss, inputs))


def check_all(out, ref, dtype, what):
    for name, a, b in zip(("loss", "grad 1", "grad 2"), out, ref, strict=False):
        assert a.shape == b.shape, f"{what} {name}"
        assert_close(a, b, dtype, f"{what} {name}")


def teacher_of(x, w, y, scale=0.5, seed=1):
    """Teacher embeddings close to their own centers (every teacher cosine > 0)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.device, x.dtype)
    return (R.normalize(w.detach()[y.clamp_min(0)]) + scale * R.normalize(noise)).to(x.dtype)


# --- MarginDistillation and ProxylessKD (built on the fused margin CE) ----------------------------------
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["embeddings", "cos", "fixed_dmax"])
def test_margin_distillation(backend, dtype, shape, mode, monkeypatch):
    x, w, y = make(*shape, dtype, device_for(backend))
    t = teacher_of(x, w, y)
    kw = dict(teacher_embeddings=t) if mode == "embeddings" else dict(teacher_cos=R.teacher_target_cosine(t, w, y))
    if mode == "fixed_dmax":
        kw["dmax"] = 1.3
    ref = grads(R.margin_distillation_loss(x, w, y, **kw), x)
    seen = []
    real = mce.backward_impl
    monkeypatch.setattr(mce, "backward_impl", lambda *a: seen.append(a[-2]) or real(*a))  # need_dw (second to last)
    out = grads(mdkernels.margin_distillation_loss(x, w, y, backend=backend, **kw), x)
    check_all(out, ref, dtype, f"margin distillation {mode}")
    assert seen == [False]  # the teacher centers are frozen: no dW GEMM


def test_margin_distillation_module_and_bad_input():
    x, w, y = make(9, 64, 300, torch.float64)
    t = teacher_of(x, w, y)
    mod = mdkernels.nn.MarginDistillation(w, backend="torch").double()
    assert "teacher_centers" in mod.state_dict() and not list(mod.parameters())
    assert mod(x, y, teacher_embeddings=t).item() == pytest.approx(
        R.margin_distillation_loss(x, w, y, teacher_embeddings=t).item(), rel=1e-10
    )
    with pytest.raises(ValueError, match="Dmax"):
        mdkernels.margin_distillation_loss(x, w, y, teacher_cos=-torch.rand(9, dtype=torch.float64))
    with pytest.raises(ValueError, match="exactly one"):
        mdkernels.margin_distillation_loss(x, w, y)
    with pytest.raises(ValueError, match="teacher_embeddings must have 9 rows"):
        mdkernels.margin_distillation_loss(x, w, y, teacher_embeddings=t[:4])


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("margin,m", [("arcface", 0.5), ("cosface", 0.35), ("sphereface", 1.35)])
def test_proxyless_kd(backend, margin, m):
    x, w, y = make(37, 500, 1017, torch.float64, device_for(backend))
    ref = grads(R.proxyless_kd_loss(x, w, y, margin=margin, m=m), x)
    out = grads(mdkernels.proxyless_kd_loss(x, w, y, margin=margin, m=m, backend=backend), x)
    check_all(out, ref, torch.float64, f"proxyless {margin}")


def test_proxyless_module_projection_and_bad_input():
    x, w, y = make(8, 64, 100, torch.float32)
    with pytest.raises(ValueError, match="ProxylessKD trains the student in the teacher's embedding space"):
        mdkernels.proxyless_kd_loss(x[:, :32], w, y)
    mod = mdkernels.nn.ProxylessKD(w, projection=True, embedding_size=32)
    loss = mod(x[:, :32].detach(), y)
    loss.backward()
    assert mod.projection.weight.grad is not None and torch.isfinite(loss)
    with pytest.raises(ValueError, match="margin must be one of"):
        mdkernels.proxyless_kd_loss(x, w, y, margin="adaface")


# --- angular distillation --------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("shape,per", [((1, 500), "sample"), ((37, 500), "sample"), ((3, 5, 4, 7), "sample"),
                                       ((3, 5, 4, 7), "position")])  # fmt: skip
def test_angular_distillation(backend, dtype, p, shape, per):
    g = torch.Generator().manual_seed(0)
    dev = device_for(backend)
    s = torch.randn(*shape, generator=g, dtype=torch.float64).to(dev, dtype).requires_grad_()
    t = torch.randn(*shape, generator=g, dtype=torch.float64).to(dev, dtype)
    ref = grads(R.angular_distillation_loss(s, t, p=p, per=per), s)
    out = grads(mdkernels.angular_distillation_loss(s, t, p=p, per=per, backend=backend), s)
    check_all(out, ref, dtype, f"angular p={p} {per}")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_angular_gradcheck_and_identical_inputs(backend):
    dev = device_for(backend)
    s = torch.randn(4, 6, dtype=torch.float64, device=dev, requires_grad=True)
    t = torch.randn(4, 6, dtype=torch.float64, device=dev)
    for p in (1.0, 2.0, 3.0):
        fn = lambda s, p=p: mdkernels.angular_distillation_loss(s, t, p=p, backend=backend)
        assert torch.autograd.gradcheck(fn, (s,))
    same = mdkernels.angular_distillation_loss(s, s.detach() * 2, backend=backend)
    (g,) = torch.autograd.grad(same, s)
    assert abs(same.item()) < 1e-12 and torch.isfinite(g).all()


def test_angular_module_adapters_and_bad_input():
    torch.manual_seed(0)
    mod = mdkernels.nn.AngularDistillation(channels=[(8, 16), (32, 32)], weights=[1.0, 7.0], backend="torch")
    fs = [torch.randn(2, 8, 5, 5, requires_grad=True), torch.randn(2, 32, requires_grad=True)]
    ft = [torch.randn(2, 16, 5, 5), torch.randn(2, 32)]
    loss = mod(fs, ft)
    loss.backward()
    expect = R.angular_distillation_loss(mod.adapters[0](fs[0]), ft[0]) + 7.0 * R.angular_distillation_loss(
        fs[1], ft[1]
    )
    assert loss.item() == pytest.approx(expect.item(), rel=1e-5)
    assert mod.adapters[0].weight.grad is not None and fs[0].grad is not None
    with pytest.raises(ValueError, match="same shape"):
        mdkernels.angular_distillation_loss(torch.randn(2, 8), torch.randn(2, 9))
    with pytest.raises(ValueError, match="p must be >= 1"):
        mdkernels.angular_distillation_loss(torch.randn(2, 8), torch.randn(2, 8), p=0.5)
    with pytest.raises(ValueError, match="per must be"):
        mdkernels.angular_distillation_loss(torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2), per="pixel")


# --- triplet distillation --------------------------------------------------------------------------------
def triplet_data(B, D, dtype, dev, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, D, generator=g, dtype=torch.float64).to(dev, dtype).requires_grad_()
    t = torch.randn(B, D, generator=g, dtype=torch.float64).to(dev, dtype)
    y = torch.randint(0, classes, (B,), generator=g).to(dev)
    if B > 3:
        y[3] = -1
    return s, t, y


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


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_triplet_all_allocates_no_cube(backend):
    B = 512 if backend == "torch" else 96
    s, t, y = triplet_data(B, 8, torch.float32, device_for(backend), classes=B // 8)
    with _LargestAllocation() as mode:
        loss = mdkernels.triplet_distillation_loss(s, t, labels=y, backend=backend)
        loss.backward()
    assert loss.item() > 0
    assert mode.largest <= max(1 << 22, 4 * B * B), f"largest allocation {mode.largest}, B^3 = {B**3}"


# --- Hinton KD on margin logits ----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kw", [dict(), dict(T=1.0, alpha=0.5, m2=0.3), dict(T=2.5, alpha=1.0, s=30.0)],
                         ids=["paper", "T1", "pureKD"])  # fmt: skip
def test_margin_kd(backend, dtype, shape, kw):
    x, w, y = make(*shape, dtype, device_for(backend))
    t = teacher_of(x, w, y, scale=1.0)
    ref = grads(R.margin_kd_loss(x, t, w, y, **kw), x, w)
    out = grads(mdkernels.margin_kd_loss(x, t, w, y, backend=backend, **kw), x, w)
    check_all(out, ref, dtype, f"margin kd {kw}")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_margin_kd_reductions_frozen_centers_and_module(backend):
    x, w, y = make(13, 64, 301, torch.float64, device_for(backend))
    t = teacher_of(x, w, y)
    rows = mdkernels.margin_kd_loss(x, t, w.detach(), y, reduction="none", backend=backend)
    ref = R.margin_kd_loss(x, t, w.detach(), y, reduction="none")
    assert_close(rows.detach(), ref.detach(), torch.float64, "rows")
    assert rows[13 // 2].item() == 0.0  # ignored row
    mod = mdkernels.nn.MarginKD(w, backend=backend)
    loss = mod(x, t, y)
    (gx,) = torch.autograd.grad(loss, x)
    assert_close(gx, torch.autograd.grad(R.margin_kd_loss(x, t, w.detach(), y), x)[0], torch.float64, "module dx")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_margin_kd_allocates_no_batch_by_classes(backend):
    B, D, C = 64, 16, 50_000 if backend == "torch" else 8_000
    dev = device_for(backend)
    x, w, y = (v.detach() for v in make(B, D, C, torch.float32, dev))
    t = teacher_of(x, w, y)
    args = (4.0, 0.95, 64.0, 1.0, 0.5, 0.0, True, -1)
    with _LargestAllocation() as mode:
        loss_rows, lse_s, lse_sT, lse_tT, rxs, rxt, rw = mkd.forward_impl(x, t, w, y, *args, backend)
        mkd.backward_impl(torch.ones_like(loss_rows), x, t, w, y, lse_s, lse_sT, lse_tT, rxs, rxt, rw, *args, True,
                          backend)  # fmt: skip
    assert 0 < mode.largest <= max(C * D, B * C // 4), f"largest allocation {mode.largest}, B*C = {B * C}"


def test_margin_kd_bad_input_opcheck_and_compile():
    x, w, y = make(6, 40, 50, torch.float32)
    t = teacher_of(x, w, y)
    with pytest.raises(ValueError, match="T .* must be > 0"):
        mdkernels.margin_kd_loss(x, t, w, y, T=0.0)
    with pytest.raises(ValueError, match="alpha must be in"):
        mdkernels.margin_kd_loss(x, t, w, y, alpha=1.5)
    with pytest.raises(ValueError, match="teacher_embeddings must have 40 columns"):
        mdkernels.margin_kd_loss(x, t[:, :20], w, y)
    args = (x, t, w, y, 4.0, 0.95, 16.0, 1.0, 0.5, 0.0, True, -1, "torch")
    torch.library.opcheck(mkd.margin_kd_forward, args)

    def step(x, t, y):
        return mdkernels.margin_kd_loss(x, t, w, y, backend="torch") + mdkernels.angular_distillation_loss(
            x, t, backend="torch"
        )

    eager = step(x, t, y)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, t, y)
    assert compiled.item() == pytest.approx(eager.item(), rel=1e-6)


# --- GPU: half precision against the fp64 truth ------------------------------------------------------------
def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 1e-2)])
@pytest.mark.parametrize("op", ["margin_distillation", "proxyless", "margin_kd", "angular", "triplet"])
def test_gpu_half_precision(backend, dtype, tol, op):
    x, w, y = make(67, 500, 4099, dtype, "cuda")
    t = teacher_of(x, w, y)
    calls = {
        "margin_distillation": lambda m, x, w, **kw: m.margin_distillation_loss(
            x, w, y, teacher_embeddings=t.to(x.dtype), **kw
        ),
        "proxyless": lambda m, x, w, **kw: m.proxyless_kd_loss(x, w, y, **kw),
        "margin_kd": lambda m, x, w, **kw: m.margin_kd_loss(x, t.to(x.dtype), w, y, **kw),
        "angular": lambda m, x, w, **kw: m.angular_distillation_loss(x, t.to(x.dtype), **kw),
        "triplet": lambda m, x, w, **kw: m.triplet_distillation_loss(x, t.to(x.dtype), labels=y % 13, **kw),
    }
    fn = calls[op]
    xd, wd = x.detach().double().requires_grad_(), w.detach().double()
    truth = grads(fn(R, xd, wd), xd)
    fast = grads(fn(mdkernels, x, w.detach(), backend=backend), x)
    assert abs(fast[0].item() - truth[0].item()) <= tol * max(1.0, abs(truth[0].item()))
    assert _rel(fast[1], truth[1]) <= tol


@pytest.mark.gpu
@pytest.mark.skipif(not mdkernels.info()["cuda_extension"], reason="CUDA module not built in this install")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,per", [((67, 500), "sample"), ((3, 64, 7, 9), "sample"), ((3, 64, 7, 9), "position")])
def test_cuda_angular_kernels_against_truth(dtype, shape, per):
    from conftest import assert_close_to_truth

    g = torch.Generator().manual_seed(0)
    s = torch.randn(*shape, generator=g).to("cuda", dtype).requires_grad_()
    t = torch.randn(*shape, generator=g).to("cuda", dtype)
    sd = s.detach().double().requires_grad_()
    truth = grads(R.angular_distillation_loss(sd, t.double(), per=per), sd)
    plain = grads(R.angular_distillation_loss(s, t, per=per), s)
    fast = grads(mdkernels.angular_distillation_loss(s, t, per=per, backend="cuda"), s)
    for f, p_, tr, name in zip(fast, plain, truth, ("loss", "ds"), strict=True):
        assert_close_to_truth(f, p_, tr, f"cuda angular {dtype} {name}")


def test_cuda_backend_is_a_clear_error_without_cuda_tensors():
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA"):
        mdkernels.angular_distillation_loss(torch.randn(2, 8), torch.randn(2, 8), backend="cuda")


def test_cuda_backend_without_a_kernel_is_an_error_not_a_fallback():
    s, t, y, w = torch.randn(8, 16), torch.randn(8, 16), torch.randint(0, 3, (8,)), torch.randn(10, 16)
    with pytest.raises(ValueError, match="no kernel for triplet_distillation_loss"):
        mdkernels.triplet_distillation_loss(s, t, labels=y, backend="cuda")
    with pytest.raises(ValueError, match="no kernel for margin_kd_loss"):
        mdkernels.margin_kd_loss(s, t, w, y, backend="cuda")
