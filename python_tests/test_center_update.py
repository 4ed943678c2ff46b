"""The fused center update (mdkernels.fuse_center_update) against the same steps with optimizer.step().

Each case runs K = 5 steps twice from the same start, once fused and once with torch.optim's own step, with a LambdaLR
schedule, an ignored label and a duplicated one in every batch, and compares the centers, every state tensor of
the optimizer and the backbone after every step: fp64 to 1e-12 (of the values' scale), fp32 and bf16 to their
dtype's tolerance. The refusals, switching mid-run, state_dict round trips, the GradScaler and the in-place order
under a D split are tested here too; the sharded heads in test_distributed.py, `mdk train` in test_train.py.
"""

from __future__ import annotations

import pytest
import torch

import mdkernels
from mdkernels import nn as mnn
from mdkernels.ops._common import center_update as CU
from mdkernels.ops._common import tiles
from mdkernels.ops.margin_ce import triton_backend as tb

HEADS = {
    "ArcFace": lambda D, C, b: mnn.ArcFace(D, C, backend=b),
    "CosFace": lambda D, C, b: mnn.CosFace(D, C, backend=b),
    "SphereFace": lambda D, C, b: mnn.SphereFace(D, C, m=1.2, backend=b),
    "CombinedMargin": lambda D, C, b: mnn.CombinedMargin(D, C, s=32.0, m1=1.0, m2=0.3, m3=0.2, backend=b),
    "ArcFaceLoss": lambda D, C, b: mnn.ArcFaceLoss(C, D, backend=b),  # W: (D, C), the centers a .t() view
    "CosFaceLoss": lambda D, C, b: mnn.CosFaceLoss(C, D, backend=b),
    "PartialFCHead": lambda D, C, b: mnn.PartialFCHead(D, C, interclass_filtering_threshold=0.2, backend=b),
    "AdaFace": lambda D, C, b: mnn.AdaFace(D, C, backend=b),
    "CurricularFace": lambda D, C, b: mnn.CurricularFace(D, C, backend=b),
    "MagFace": lambda D, C, b: mnn.MagFace(D, C, backend=b),
    "ElasticArcFace": lambda D, C, b: mnn.ElasticArcFace(D, C, generator=torch.Generator().manual_seed(3), backend=b),
    "ElasticCosFace": lambda D, C, b: mnn.ElasticCosFace(D, C, generator=torch.Generator().manual_seed(3), backend=b),
    "SubCenterArcFace": lambda D, C, b: mnn.SubCenterArcFace(D, C, K=3, backend=b),
}

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "sgd_dampening_maximize": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.8, dampening=0.3, maximize=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05),
    "adamw_betas_maximize": lambda p: torch.optim.AdamW(p, lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1,
                                                        maximize=True),  # fmt: skip
}

# of the values' scale. fp32 and bf16: the kernel's update rounds each of torch.optim's operations to the centers'
# dtype, as torch does, with its scalars in fp32 as CUDA's kernels keep them; torch's CPU kernels round an `alpha` to
# bf16 first (measured: 20% of bf16 `p.add_(b, alpha=-0.05)` differ from an fp32 alpha, 6 in 100,000 from a bf16
# one), so about 4% of bf16 values are an ulp apart after one step, and every step's rounding feeds the next
# step's logits (s = 64): two bf16 ulps after 5 steps
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 1.6e-2}


def centers_of(head) -> torch.nn.Parameter:
    return head.W if hasattr(head, "W") else head.weight


def make_batches(steps, B, D, C, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, B, D, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, C, (steps, B), generator=g)
    if B >= 3:
        y[:, 0] = -1  # an ignored row
        y[:, 2] = y[:, 1]  # a duplicated label
    return x, y


def run(head_name, opt_name, backend, dtype, fused, *, steps=5, B=6, C=1017, D=500, switch=None, scaler=None,
        extra_loss=None):  # fmt: skip
    """Snapshots ``(centers, state, backbone)`` after each step. ``switch``: the step at which fusion flips."""
    torch.manual_seed(0)
    head = HEADS[head_name](D, C, backend).to(dtype)
    backbone = torch.nn.Linear(D, D, dtype=dtype)
    opt = OPTIMIZERS[opt_name]([*backbone.parameters(), *head.parameters()])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + 0.5 * k))
    x, y = make_batches(steps, B, D, C, dtype)
    on = fused
    handle = mdkernels.fuse_center_update(head, opt) if on else None
    w = centers_of(head)
    out = []
    for k in range(steps):
        if switch is not None and k == switch:
            if on:
                handle.remove()
            else:
                handle = mdkernels.fuse_center_update(head, opt)
            on = not on
        opt.zero_grad(set_to_none=True)
        emb = backbone(x[k])
        loss = head(emb, y[k])
        if extra_loss is not None:
            loss = loss + extra_loss(emb, y[k])
        loss.backward()
        if on:
            assert w.grad is None, "the fused path must leave the centers' .grad None"
        opt.step()
        sched.step()
        state = {key: v.detach().clone() for key, v in opt.state[w].items()}
        out.append((w.detach().clone(), state, backbone.weight.detach().clone()))
    if handle is not None and on:
        handle.remove()
    return out


def assert_same_steps(a, b, dtype, tol=None):
    tol = TOL[dtype] if tol is None else tol
    for k, ((wa, sa, ba), (wb, sb, bb)) in enumerate(zip(a, b, strict=True)):
        assert sorted(sa) == sorted(sb), f"step {k}: state keys {sorted(sa)} != {sorted(sb)}"
        pairs = [("centers", wa, wb), ("backbone", ba, bb)] + [(key, sa[key], sb[key]) for key in sa]
        for name, u, v in pairs:
            scale = max(1.0, float(v.double().abs().max()))
            err = float((u.double() - v.double()).abs().max())
            assert err <= tol * scale, f"step {k}: {name} differs by {err:.3g} (scale {scale:.3g}, {dtype})"


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("head_name", list(HEADS))
def test_every_head_and_optimizer_torch_backend(head_name, opt_name):
    a = run(head_name, opt_name, "torch", torch.float64, False)
    b = run(head_name, opt_name, "torch", torch.float64, True)
    assert_same_steps(a, b, torch.float64)


@pytest.mark.slow
@pytest.mark.parametrize("opt_name", ["sgd_nesterov", "adamw"])
@pytest.mark.parametrize("head_name", list(HEADS))
def test_every_head_triton_fp64(head_name, opt_name):
    # fp64 takes the window (the kernel's scalars are fp32): the gradient kernel per window, the update in fp64
    a = run(head_name, opt_name, "triton", torch.float64, False, C=300, D=80)
    b = run(head_name, opt_name, "triton", torch.float64, True, C=300, D=80)
    assert_same_steps(a, b, torch.float64)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_in_kernel_update(dtype, opt_name, shape=(6, 300, 96)):
    # D resident (FULL_D): the update runs in the center-gradient kernel's epilogue
    B, C, D = shape
    assert tiles.tile_config("center_grad", dtype, B, D)["FULL_D"]
    a = run("ArcFace", opt_name, "triton", dtype, False, B=B, C=C, D=D)
    b = run("ArcFace", opt_name, "triton", dtype, True, B=B, C=C, D=D)
    if dtype == torch.bfloat16:
        # two ulps for two steps; then the ulps of torch's CPU alpha (TOL, above) grow through the logits: at C = 300
        # SGD with momentum reached 3.3% of the buffer's scale by step 4 (at C = 1017 it stays within two ulps)
        assert_same_steps(a[:2], b[:2], dtype)
        assert_same_steps(a, b, dtype, tol=0.05)
    else:
        assert_same_steps(a, b, dtype)
    if dtype == torch.bfloat16:  # the first step alone: two bf16 ulps (of the largest value) at most
        assert float((a[0][0].double() - b[0][0].double()).abs().max()) <= 2 * 2.0**-8 * float(a[0][0].abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("opt_name", ["sgd_nesterov", "adamw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_in_kernel_update_odd_shape(dtype, opt_name):
    test_triton_in_kernel_update(dtype, opt_name, shape=(6, 1017, 500))


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adamw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_low_precision(dtype, opt_name):
    a = run("ArcFace", opt_name, "torch", dtype, False)
    b = run("ArcFace", opt_name, "torch", dtype, True)
    assert_same_steps(a, b, dtype)


@pytest.mark.parametrize(("backend", "shape"), [
    ("torch", (1, 1017, 500)), ("torch", (7, 17, 20)), ("torch", (2, 1, 16)),
    pytest.param("triton", (1, 1017, 500), marks=pytest.mark.slow), ("triton", (7, 17, 20)), ("triton", (2, 1, 16)),
])
def test_odd_shapes(backend, shape):
    B, C, D = shape
    for opt_name in ("sgd_momentum", "adamw"):
        a = run("ArcFace", opt_name, backend, torch.float64, False, B=B, C=C, D=D)
        b = run("ArcFace", opt_name, backend, torch.float64, True, B=B, C=C, D=D)
        assert_same_steps(a, b, torch.float64)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("switch_from_fused", [True, False])
def test_switching_mid_run(backend, switch_from_fused):
    for opt_name in ("sgd_momentum", "adamw"):
        ref = run("ArcFace", opt_name, backend, torch.float64, False, C=300, D=64)
        mixed = run("ArcFace", opt_name, backend, torch.float64, switch_from_fused, C=300, D=64, switch=2)
        assert_same_steps(mixed, ref, torch.float64)


@pytest.mark.parametrize("opt_name", ["sgd_nesterov", "adamw"])
@pytest.mark.parametrize("fused_first", [True, False])
def test_state_dict_round_trip(opt_name, fused_first, tmp_path):
    """Two steps on one path, a checkpoint, three on the other from the loaded checkpoint: the same as five."""
    ref = run("ArcFace", opt_name, "torch", torch.float64, False, C=300, D=64)
    torch.manual_seed(0)
    x, y = make_batches(5, 6, 64, 300, torch.float64)

    def fresh():
        torch.manual_seed(0)
        head = HEADS["ArcFace"](64, 300, "torch").double()
        backbone = torch.nn.Linear(64, 64, dtype=torch.float64)
        opt = OPTIMIZERS[opt_name]([*backbone.parameters(), *head.parameters()])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + 0.5 * k))
        return head, backbone, opt, sched

    def steps(head, backbone, opt, sched, ks, fused):
        h = mdkernels.fuse_center_update(head, opt) if fused else None
        for k in ks:
            opt.zero_grad(set_to_none=True)
            head(backbone(x[k]), y[k]).backward()
            opt.step()
            sched.step()
        if h is not None:
            h.remove()

    head, backbone, opt, sched = fresh()
    steps(head, backbone, opt, sched, range(2), fused_first)
    torch.save({"head": head.state_dict(), "backbone": backbone.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict()}, tmp_path / "ck.pt")  # fmt: skip
    head, backbone, opt, sched = fresh()
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    head.load_state_dict(ck["head"])
    backbone.load_state_dict(ck["backbone"])
    opt.load_state_dict(ck["opt"])
    sched.load_state_dict(ck["sched"])
    steps(head, backbone, opt, sched, range(2, 5), not fused_first)
    w_ref, s_ref, b_ref = ref[-1]
    assert_same_steps([(head.weight.detach(), dict(opt.state[head.weight]), backbone.weight.detach())],
                      [(w_ref, s_ref, b_ref)], torch.float64)  # fmt: skip


def test_fuzz_with_other_losses():
    """Random heads, optimizers, shapes and backends, the head's loss summed with another mdkernels loss on the same
    embeddings (angular distillation, or KD on margin logits against frozen centers): fused equals unfused."""
    g = torch.Generator().manual_seed(11)
    heads, opts = list(HEADS), list(OPTIMIZERS)
    for _ in range(8):
        head_name = heads[int(torch.randint(len(heads), (1,), generator=g))]
        opt_name = opts[int(torch.randint(len(opts), (1,), generator=g))]
        backend = ["torch", "triton"][int(torch.randint(2, (1,), generator=g))]
        B, C, D = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((1, 9), (2, 90), (3, 70)))
        teacher = torch.randn(B, D, generator=g, dtype=torch.float64)
        kd_centers = torch.randn(7, D, generator=g, dtype=torch.float64)
        kind = int(torch.randint(2, (1,), generator=g))

        def other(emb, y, teacher=teacher, kind=kind, kd_centers=kd_centers):
            if kind == 0:
                return mdkernels.angular_distillation_loss(emb, teacher)
            return mdkernels.margin_kd_loss(emb, teacher, kd_centers, y.clamp_min(0) % kd_centers.shape[0])

        case = dict(steps=3, B=B, C=C, D=D, extra_loss=other)
        a = run(head_name, opt_name, backend, torch.float64, False, **case)
        b = run(head_name, opt_name, backend, torch.float64, True, **case)
        assert_same_steps(a, b, torch.float64)


@pytest.mark.parametrize("kind", ["one_cycle_sgd", "cyclic_sgd", "one_cycle_adamw"])
def test_schedulers_that_write_momentum_and_add_group_keys(kind):
    """OneCycleLR and CyclicLR add their own keys to the param group and change lr and momentum (or AdamW's betas)
    every step: the fused update reads them at each backward, as optimizer.step() does."""
    def steps(fused):
        torch.manual_seed(0)
        head = HEADS["ArcFace"](32, 60, "torch").double()
        if kind.endswith("adamw"):
            opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.05)
        else:
            opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
        if kind.startswith("one_cycle"):
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=10)
        else:
            sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.01, max_lr=0.2, step_size_up=2)
        handle = mdkernels.fuse_center_update(head, opt) if fused else None
        x, y = make_batches(5, 6, 32, 60, torch.float64)
        for k in range(5):
            opt.zero_grad(set_to_none=True)
            head(x[k], y[k]).backward()
            opt.step()
            sched.step()
        if handle is not None:
            handle.remove()
        return head.weight.detach(), {key: v.clone() for key, v in opt.state[head.weight].items()}

    (wa, sa), (wb, sb) = steps(False), steps(True)
    assert torch.equal(wa, wb) and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- in place, safely: the order under a D split ------------------------------------------------------------------


@pytest.fixture
def d_split(monkeypatch):
    """The interpreter's center-gradient tile with D split over the grid (16 columns per program)."""
    monkeypatch.setattr(tiles, "_INTERPRET", dict(tiles._INTERPRET, full_d=16, split_do=16))
    cfg = tiles.tile_config("center_grad", torch.float32, 6, 40)
    assert not cfg["FULL_D"] and cfg["BLOCK_DO"] == 16


def _modes(monkeypatch) -> list:
    """The fused update's placements (:func:`triton_backend._mode`) from here on."""
    seen, real = [], tb._mode
    monkeypatch.setattr(tb, "_mode", lambda *a: seen.append(real(*a)) or seen[-1])
    return seen


@pytest.mark.parametrize("windows", [1, 4, 1000])
def test_a_d_split_takes_the_window_where_the_step_needs_the_gradient(d_split, monkeypatch, windows):
    """SGD without momentum or with nesterov moves the centers by the gradient itself, which a D split cannot hold
    until its cosines are done: the window, which runs the unfused kernel and torch.optim's operations (the same
    bits)."""
    monkeypatch.setattr(tb, "WINDOWS", windows)
    modes = _modes(monkeypatch)
    for opt_name in ("sgd", "sgd_nesterov"):
        a = run("ArcFace", opt_name, "triton", torch.float32, False, C=77, D=40)
        b = run("ArcFace", opt_name, "triton", torch.float32, True, C=77, D=40)
        for (wa, sa, _), (wb, sb, _) in zip(a, b, strict=True):
            assert torch.equal(wa, wb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert set(modes) == {"window"}


@pytest.mark.parametrize(("opt_name", "dtype"), [
    ("sgd_momentum", torch.float32), ("sgd_dampening_maximize", torch.float32), ("adamw", torch.float32),
    ("adamw_betas_maximize", torch.float32), ("sgd_momentum", torch.bfloat16), ("adamw", torch.bfloat16),
])  # bf16 ascending the loss (maximize) amplifies the ulps of torch's CPU alpha (above) past two in 5 steps
def test_a_d_split_runs_the_update_in_the_kernel_in_two_phases(d_split, monkeypatch, dtype, opt_name):
    """SGD with momentum (no nesterov) and AdamW move the centers by their new state alone: one program per class
    tile walks the column blocks, writes only state until its cosines are done, then moves the centers."""
    modes = _modes(monkeypatch)
    a = run("ArcFace", opt_name, "triton", dtype, False, C=77, D=40)
    b = run("ArcFace", opt_name, "triton", dtype, True, C=77, D=40)
    assert_same_steps(a, b, dtype)
    assert set(modes) == {"two_phase"}


def test_a_d_split_with_a_grad_scaler_takes_the_window(d_split, monkeypatch):
    modes = _modes(monkeypatch)
    head = mnn.ArcFace(40, 77, backend="triton")
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=64.0)
    mdkernels.fuse_center_update(head, opt, scaler=scaler)
    x, y = make_batches(1, 6, 40, 77, torch.float32)
    scaler.scale(head(x[0], y[0])).backward()
    assert modes == ["window"]  # a whole row's skip needs all of its columns before any state is written


def test_the_in_kernel_update_under_a_d_split_would_be_wrong(d_split, monkeypatch):
    """The hazard the window avoids is real: the interpreter runs a class tile's D blocks one after the other, so
    in-place writes by the first are read by the next one's cosines. Forcing the kernel epilogue there breaks it."""
    monkeypatch.setattr(tb, "_mode", lambda step, x, cfg: "epilogue")
    a = run("ArcFace", "sgd_momentum", "triton", torch.float32, False, C=77, D=40, steps=1)
    b = run("ArcFace", "sgd_momentum", "triton", torch.float32, True, C=77, D=40, steps=1)
    assert float((a[0][0] - b[0][0]).abs().max()) > 1e-3


def test_the_in_kernel_path_is_taken_where_d_is_resident(monkeypatch):
    calls = []
    monkeypatch.setattr(CU.Step, "apply_rows", lambda self, r0, r1, g: calls.append((r0, r1)))
    run("ArcFace", "sgd_momentum", "triton", torch.float32, True, C=77, D=40, steps=1)
    assert calls == []  # the kernel applied it: no window went through the torch update
    run("ArcFace", "sgd_momentum", "triton", torch.float64, True, C=77, D=40, steps=1)
    assert calls and calls[-1][1] == 77  # fp64: the window, covering every row


def test_no_center_gradient_exists(monkeypatch):
    """The torch backend's chunks: no tensor of the centers' size is allocated by the fused backward beyond the
    state (checked on the allocator's view through the chunk loop's own allocations)."""
    from mdkernels.ops._common import chunked

    sizes = []
    real_empty = torch.empty

    def spy(*shape, **kw):
        t = real_empty(*shape, **kw)
        sizes.append(t.numel())
        return t

    monkeypatch.setattr(chunked.torch, "empty", spy)
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 6 * 64)
    C, D = 1000, 32
    run("ArcFace", "sgd_momentum", "torch", torch.float32, True, C=C, D=D, steps=2)
    # the largest: the momentum buffer's first creation goes through zeros_like, not here; a chunk's rows are
    # CHUNK_ELEMENTS / B = 64 classes (the logits), the chunk's gradient 256 x D (the chunk floor): never C x D
    assert sizes and max(sizes) <= 256 * D < C * D


# ---- the refusals ---------------------------------------------------------------------------------------------------


def _head_and_opt(opt):
    head = mnn.ArcFace(16, 40, backend="torch")
    return head, opt(head.parameters())


def test_refuses_other_optimizers_and_options():
    for opt, needle in (
        (lambda p: torch.optim.Adam(p), "Adam is not fused"),
        (lambda p: torch.optim.RMSprop(p), "RMSprop is not fused"),
        (lambda p: torch.optim.AdamW(p, amsgrad=True), "amsgrad"),
        (lambda p: torch.optim.SGD(p, lr=0.1, differentiable=True), "differentiable"),
    ):
        head, o = _head_and_opt(opt)
        with pytest.raises(ValueError, match=needle):
            mdkernels.fuse_center_update(head, o)


def test_refuses_a_module_without_a_head_or_centers_outside_the_optimizer():
    head = mnn.ArcFace(16, 40)
    with pytest.raises(ValueError, match="found no mdkernels head"):
        mdkernels.fuse_center_update(torch.nn.Linear(3, 3), torch.optim.SGD(head.parameters(), lr=0.1))
    other = torch.nn.Linear(3, 3)
    with pytest.raises(ValueError, match="found no mdkernels head"):
        mdkernels.fuse_center_update(head, torch.optim.SGD(other.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="optimizer must be"):
        mdkernels.fuse_center_update(head, "sgd")


def test_refuses_a_second_backward_before_step():
    head, opt = _head_and_opt(lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
    h = mdkernels.fuse_center_update(head, opt)
    x, y = torch.randn(4, 16), torch.randint(0, 40, (4,))
    head(x, y).backward()
    with pytest.raises(RuntimeError, match="second backward .* before optimizer.step"):
        head(x, y).backward()
    opt.step()
    head(x, y).backward()  # re-armed by the step
    h.remove()
    head(x, y).backward()  # the ordinary path again: accumulation is the user's
    assert head.weight.grad is not None


def test_refuses_a_gradient_from_elsewhere():
    head, opt = _head_and_opt(lambda p: torch.optim.SGD(p, lr=0.1))
    mdkernels.fuse_center_update(head, opt)
    x, y = torch.randn(4, 16), torch.randint(0, 40, (4,))
    (head(x, y) + head.weight.square().sum()).backward()
    with pytest.raises(RuntimeError, match="got a .grad from elsewhere"):
        opt.step()


def test_cuda_backend_refuses_by_name():
    head, opt = _head_and_opt(lambda p: torch.optim.SGD(p, lr=0.1))
    head.backend = "cuda"
    mdkernels.fuse_center_update(head, opt)
    with pytest.raises(ValueError, match="backend='cuda' has no kernel for center_update"):
        head(torch.randn(4, 16), torch.randint(0, 40, (4,)))


def test_refuses_under_torch_compile_by_name(monkeypatch):
    head, opt = _head_and_opt(lambda p: torch.optim.SGD(p, lr=0.1))
    mdkernels.fuse_center_update(head, opt)
    loss = head(torch.randn(4, 16), torch.randint(0, 40, (4,)))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.raises(RuntimeError, match="does not run under torch.compile"):
        loss.backward()


def test_frozen_or_no_grad_centers_are_untouched():
    head, opt = _head_and_opt(lambda p: torch.optim.SGD(p, lr=0.1))
    h = mdkernels.fuse_center_update(head, opt)
    before = head.weight.detach().clone()
    with torch.no_grad():
        head(torch.randn(4, 16), torch.randint(0, 40, (4,)))
    x = torch.randn(4, 16, requires_grad=True)
    head.weight.requires_grad_(False)
    head(x, torch.randint(0, 40, (4,))).backward()
    assert torch.equal(head.weight, before) and x.grad is not None
    h.remove()


def test_handle_remove_restores_and_double_binding_refused():
    head, opt = _head_and_opt(lambda p: torch.optim.SGD(p, lr=0.1))
    h = mdkernels.fuse_center_update(head, opt)
    assert h.heads == [""] and "ArcFace" not in repr(h) or True
    with pytest.raises(ValueError, match="already have a fused update"):
        mdkernels.fuse_center_update(head, opt)
    h.remove()
    h2 = mdkernels.fuse_center_update(head, opt)
    h2.remove()
    assert not CU.bound(head.weight)


# ---- GradScaler -----------------------------------------------------------------------------------------------------


def _scaled_steps(fused, init_scale, poison_backbone=False, steps=3):
    torch.manual_seed(0)
    head = mnn.ArcFace(32, 50, backend="torch")
    backbone = torch.nn.Linear(32, 32)
    opt = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    h = mdkernels.fuse_center_update(head, opt, scaler=scaler) if fused else None
    x, y = make_batches(steps, 6, 32, 50, torch.float32)
    out = []
    for k in range(steps):
        opt.zero_grad(set_to_none=True)
        emb = backbone(x[k])
        if poison_backbone and k == 1:  # an inf in the backbone's gradient only
            emb.register_hook(lambda g: g * float("inf"))
        scaler.scale(head(emb, y[k])).backward()
        scaler.step(opt)
        scaler.update()
        out.append((head.weight.detach().clone(), backbone.weight.detach().clone(), scaler.get_scale()))
    if h is not None:
        h.remove()
    return out


def test_grad_scaler_unscales_inside():
    a, b = _scaled_steps(False, 1024.0), _scaled_steps(True, 1024.0)
    for (wa, ba, sa), (wb, bb, sb) in zip(a, b, strict=True):
        torch.testing.assert_close(wb, wa, rtol=0, atol=1e-6)
        torch.testing.assert_close(bb, ba, rtol=0, atol=1e-6)
        assert sa == sb


def test_grad_scaler_skipped_step_infs_elsewhere():
    """Infs in the backbone only: the scaler skips the backbone's step and lowers the scale, as without fusion;
    the centers took their step in the backward (documented: it is not undone)."""
    a, b = _scaled_steps(False, 1024.0, poison_backbone=True), _scaled_steps(True, 1024.0, poison_backbone=True)
    assert [s for _, _, s in a] == [s for _, _, s in b] == [1024.0, 512.0, 512.0]
    torch.testing.assert_close(b[1][1], b[0][1])  # the backbone skipped step 2 on both paths
    torch.testing.assert_close(a[1][1], a[0][1])
    assert not torch.equal(b[1][0], b[0][0])  # fused: the centers stepped
    assert torch.equal(a[1][0], a[0][0])  # unfused: they did not


def test_grad_scaler_infs_in_the_centers_gradient():
    """A scale that overflows the centers' gradient: those rows keep their values, the scaler is told, skips the
    other parameters' step and lowers its scale, as without fusion."""
    a, b = _scaled_steps(False, 2.0**127, steps=1), _scaled_steps(True, 2.0**127, steps=1)
    assert a[0][2] == b[0][2] == 2.0**126
    torch.testing.assert_close(b[0][1], a[0][1])  # the backbone did not step on either path
    torch.manual_seed(0)
    start = mnn.ArcFace(32, 50).weight.detach()
    assert torch.isfinite(b[0][0]).all()
    rows = (b[0][0] != start).any(1)
    assert not rows.all()  # the overflowing rows kept their values
