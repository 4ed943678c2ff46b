"""The modern margin family (mdkernels.nn.margins) against its references (mdkernels.reference.family).

Every head runs on the fused margin CE; every test here compares a fused backend with the oracle that
builds the full ``B x C`` matrix as the official code does: the loss, both gradients, the buffer
updates, in fp64 and fp32, odd shapes and ignored rows; gradcheck of every new core option; the memory
probe; and the errors of bad arguments.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FUSED_BACKENDS, assert_close, device_for, make

import mdkernels
from mdkernels import _cuda_ext
from mdkernels import reference as R
from mdkernels.nn import AdaFace, CurricularFace, ElasticArcFace, ElasticCosFace, MagFace, SubCenterArcFace
from mdkernels.ops._common import probe

SHAPES = [(1, 500, 1017), (37, 500, 1017), (64, 64, 300)]  # (B, D, C): odd D and C, B = 1


def _cos_t(x, w, y, K=1):
    safe = y.clamp_min(0)
    cos = (R.normalize(x) @ R.normalize(w).T).view(x.shape[0], -1, K).max(2).values
    return cos.gather(1, safe[:, None]).squeeze(1)


# (module factory (D, C, backend) -> head, prepare(head, x) -> None, oracle(head, x, w, y) -> (loss, buffers))
def _adaface(grad):
    def build(D, C, backend):
        return AdaFace(D, C, grad=grad, backend=backend)

    def prepare(head, x):  # statistics near this batch's norms, so z spans [-1, 1] and its clip
        n = x.detach().norm(dim=1)
        head.batch_mean.fill_(float(n.mean()))
        head.batch_std.fill_(float(n.std()) if n.numel() > 1 else 1.0)

    def oracle(head, x, w, y):
        mean, std = R.adaface_batch_stats(x.detach().norm(dim=1), y != -1, head.batch_mean, head.batch_std,
                                          head.t_alpha)  # fmt: skip
        loss = R.adaface_loss(x, w, y, batch_mean=mean, batch_std=std, m=head.m, h=head.h, s=head.s, grad=grad)
        return loss, {"batch_mean": mean, "batch_std": std}

    return build, prepare, oracle


def _curricular():
    def prepare(head, x):
        head.t.fill_(0.3)  # a t of training's middle: many hard negatives are modulated

    def oracle(head, x, w, y):
        t = R.curricular_update(head.t, _cos_t(x, w, y).clamp(-1, 1), y != -1, head.momentum)
        return R.curricularface_loss(x, w, y, t=t, m=head.m, s=head.s), {"t": t}

    return (lambda D, C, b: CurricularFace(D, C, backend=b)), prepare, oracle


def _magface(easy):
    def prepare(head, x):  # norms from 5 to 130: some below l_a, some above u_a (clamped)
        with torch.no_grad():
            g = torch.Generator().manual_seed(3)
            x.mul_((5 + 125 * torch.rand(x.shape[0], 1, generator=g, dtype=torch.float64)).to(x.dtype) / x.norm(
                dim=1, keepdim=True))  # fmt: skip

    def oracle(head, x, w, y):
        return R.magface_loss(x, w, y, s=head.s, l_a=head.l_a, u_a=head.u_a, l_m=head.l_m, u_m=head.u_m,
                              lambda_g=head.lambda_g, easy_margin=easy), {}  # fmt: skip

    return (lambda D, C, b: MagFace(D, C, easy_margin=easy, backend=b)), prepare, oracle


def _elastic(kind, plus, order="paper"):
    cls = ElasticArcFace if kind == "arc" else ElasticCosFace

    def build(D, C, backend):
        return cls(D, C, plus=plus, plus_order=order, generator=torch.Generator().manual_seed(11), backend=backend)

    def prepare(head, x):
        pass

    def oracle(head, x, w, y):
        margins = R.elastic_margins(_cos_t(x, w, y), y != -1, head.m, head.std, plus=plus, order=order,
                                    generator=torch.Generator().manual_seed(11))  # fmt: skip
        fn = R.elastic_arcface_loss if kind == "arc" else R.elastic_cosface_loss
        return fn(x, w, y, margins=margins, s=head.s), {}

    return build, prepare, oracle


def _subcenter(K):
    def oracle(head, x, w, y):
        return R.subcenter_arcface_loss(x, w, y, K=K, s=head.s, m=head.m, fallback=head.fallback), {}

    return (lambda D, C, b: SubCenterArcFace(D, C, K=K, backend=b)), (lambda head, x: None), oracle


FAMILY = {
    "adaface": _adaface("exact"),
    "adaface_straight_through": _adaface("straight_through"),
    "curricularface": _curricular(),
    "magface": _magface(easy=True),
    "magface_fallback": _magface(easy=False),
    "elastic_arcface": _elastic("arc", plus=False),
    "elastic_arcface_plus": _elastic("arc", plus=True),
    "elastic_arcface_plus_official": _elastic("arc", plus=True, order="official"),
    "elastic_cosface_plus": _elastic("cos", plus=True),
    "subcenter": _subcenter(3),
}


def _inputs(name, B, D, C, dtype, device):
    K = 3 if name.startswith("subcenter") else 1
    x, w, y = make(B, D, C * K, dtype, device)
    y = torch.where(y >= 0, y // K, y)  # labels are classes; the pull in make() went to sub-center y
    if B > 2:  # the corners every option acts on
        with torch.no_grad():
            n0, n1 = x[0].norm(), x[1].norm()
            # row 0: a small norm and a target angle past pi - m (the fallbacks, AdaFace's clip at pi - eps,
            # ElasticArcFace's cos(theta + m) past pi, CurricularFace's pre-fallback threshold)
            x[0] = 0.3 * n0 * R.normalize(-R.normalize(w[y[0] * K]) + 0.3 * R.normalize(x[0]))
            # row 1: on its center with a large norm (AdaFace's cosine clamp and its clip at eps, z = 1)
            x[1] = 3 * n1 * R.normalize(w[y[1] * K])
            # a class opposite row 0: its cosine (about -0.999) lies between CurricularFace's pre-fallback
            # threshold cos(theta_y + m) and the post-fallback target, so the threshold's definition shows
            j = (int(y[0]) + 1) % C
            w[j * K] = w[j * K].norm() * R.normalize(-R.normalize(x[0]) + 0.05 * R.normalize(w[j * K]))
    return x, w, y


def _run_family(name, backend, dtype, shape):
    build, prepare, oracle = FAMILY[name]
    B, D, C = shape
    dev = device_for(backend)
    x, w, y = _inputs(name, B, D, C, dtype, dev)
    prepare_x = x.detach().clone()
    head = build(D, C, backend).to(dev, dtype)
    prepare(head, prepare_x)
    with torch.no_grad():
        head.weight.copy_(w)
    state = {k: v.clone() for k, v in head.named_buffers()}
    xa = prepare_x.clone().requires_grad_()
    out = head(xa, y)
    gx, gw = torch.autograd.grad(out, (xa, head.weight))
    ref_head = build(D, C, "reference").to(dev, dtype)
    ref_head.load_state_dict({"weight": w.detach(), **state})
    xr, wr = prepare_x.clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref_loss, ref_buffers = oracle(ref_head, xr, wr, y)
    rx, rw = torch.autograd.grad(ref_loss, (xr, wr))
    buffers = {k: (v, state[k]) for k, v in head.named_buffers()}  # (after, before)
    return (out.detach(), gx, gw), (ref_loss.detach(), rx, rw), buffers, ref_buffers


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(FAMILY))
def test_head_matches_reference(backend, dtype, name):
    """Loss, d/dx, d/dW and the buffer updates at (37, 500, 1017) with an ignored row."""
    out, ref, buffers, ref_buffers = _run_family(name, backend, dtype, (37, 500, 1017))
    for what, a, b in zip(("loss", "d embeddings", "d weight"), out, ref, strict=True):
        assert_close(a, b, dtype, f"{name} {backend} {what}")
    for key, value in ref_buffers.items():
        after, before = buffers[key]
        assert_close(after.reshape(()), torch.as_tensor(value).reshape(()), dtype, f"{name} buffer {key}")
        assert not torch.equal(after, before), f"{name}: buffer {key} did not move"
    assert bool(ref_buffers) == name.startswith(("adaface", "curricular"))


@pytest.mark.slow
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2]], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", ["adaface", "curricularface", "magface_fallback", "elastic_arcface_plus",
                                  "subcenter"])  # fmt: skip
def test_head_odd_shapes(backend, shape, name):
    out, ref, buffers, ref_buffers = _run_family(name, backend, torch.float64, shape)
    for what, a, b in zip(("loss", "d embeddings", "d weight"), out, ref, strict=True):
        assert_close(a, b, torch.float64, f"{name} {backend} {shape} {what}")


@pytest.mark.skipif(_cuda_ext.emu is None, reason="CUDA module (and its emulator) not built")
@pytest.mark.parametrize("name", ["adaface", "adaface_straight_through", "magface", "magface_fallback",
                                  "elastic_arcface_plus", "elastic_cosface_plus"])  # fmt: skip
def test_head_on_emulated_cuda_kernels(name):
    """The options the CUDA C++ kernels have (tensor m2/m3, dL/dm2, easy margin, theta clip, cosine
    clamp), through the emulator, fp32."""
    with _cuda_ext.emulated():
        out, ref, buffers, ref_buffers = _run_family(name, "cuda", torch.float32, (37, 200, 517))
    for what, a, b in zip(("loss", "d embeddings", "d weight"), out, ref, strict=True):
        assert_close(a, b, torch.float32, f"{name} cuda {what}")


@pytest.mark.parametrize("name", ["curricularface", "subcenter"])
def test_cuda_backend_rejects_options_its_kernels_lack(name):
    build, _, _ = FAMILY[name]
    head = build(16, 10, "cuda")
    x, _, y = make(4, 16, 10, torch.float32)
    with pytest.raises(ValueError, match="backend='cuda' has no kernel for .*use backend='triton'"):
        head(x, y)
    # and the functional form: never a silent fallback
    with pytest.raises(ValueError, match="has no kernel for subcenters"):
        mdkernels.margin_cross_entropy(x, torch.randn(30, 16), y, subcenters=3, backend="cuda")


# ---- the core options, one at a time ---------------------------------------------------------------------
def _option_cases(B, dtype, g):
    rows = lambda lo, hi: (lo + (hi - lo) * torch.rand(B, generator=g, dtype=torch.float64)).to(dtype)  # noqa: E731
    return {
        "m3_rows": (dict(m2=0.0, m3=rows(0.1, 0.5)), 1),
        "m2_rows_grad": (dict(m2=rows(0.2, 0.7).requires_grad_()), 1),
        "m2_rows_grad_no_fallback": (dict(m2=rows(0.2, 0.7).requires_grad_(), fallback=False), 1),
        "m2_rows_grad_easy": (dict(m2=rows(0.2, 0.7).requires_grad_(), fallback=False, easy_margin=True), 1),
        "adaface_clip_clamp": (dict(m2=rows(-0.3, 0.3), m3=rows(0.0, 0.6), fallback=False, theta_clip=1e-3,
                                    cos_clamp=1 - 1e-3), 1),  # fmt: skip
        "curricular": (dict(curricular_t=0.4), 1),
        "curricular_tensor_filter": (dict(curricular_t=torch.tensor(0.7, dtype=dtype), interclass_filter=0.3), 1),
        "subcenters": (dict(subcenters=3), 3),
        "subcenters_curricular": (dict(subcenters=2, curricular_t=0.2), 2),
    }


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("option", list(_option_cases(1, torch.float64, torch.Generator())))
def test_gradcheck_each_option(backend, option):
    B, D, C = 4, 6, 7
    kw, K = _option_cases(B, torch.float64, torch.Generator().manual_seed(1))[option]
    x, w, y = make(B, D, C * K, torch.float64, device_for(backend), ignore=False)
    y = y // K
    m2 = kw.pop("m2", 0.5)
    inputs = [x.detach().requires_grad_(), w.detach().requires_grad_()]
    if isinstance(m2, torch.Tensor) and m2.requires_grad:
        inputs.append(m2.detach().requires_grad_())

    def fn(*args):
        margin = args[2] if len(args) == 3 else m2
        return mdkernels.margin_cross_entropy(args[0], args[1], y, s=4.0, m2=margin, backend=backend, **kw)

    # the interpreter pays per launch: Triton checks random projections of the Jacobian (fast mode)
    assert torch.autograd.gradcheck(fn, tuple(inputs), fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", FUSED_BACKENDS + (["cuda"] if _cuda_ext.emu is not None else []))
@pytest.mark.parametrize("fallback,easy", [(True, False), (False, False), (False, True)])
def test_m2_gradient_matches_autograd_through_reference(backend, fallback, easy):
    """dL/dm2 (B,) from the per-row statistics equals autograd through the B x C reference (fp64; the CUDA
    kernels through the emulator in fp32). Margins reach past pi - m for some rows (the fallback)."""
    dtype = torch.float32 if backend == "cuda" else torch.float64
    x, w, y = make(29, 40, 211, dtype, device_for(backend))
    g = torch.Generator().manual_seed(4)
    m2 = (0.1 + 1.2 * torch.rand(29, generator=g, dtype=torch.float64)).to(dtype)
    with torch.no_grad():
        x[:4] = -w[y[:4].clamp_min(0)] + 0.5 * x[:4]  # targets near pi: theta + m2 > pi
    kw = dict(fallback=fallback, easy_margin=easy, s=16.0)
    mf, mr = m2.clone().requires_grad_(), m2.clone().requires_grad_()
    ctx = _cuda_ext.emulated() if backend == "cuda" else _nullcontext()
    with ctx:
        lf = mdkernels.margin_cross_entropy(x, w, y, m2=mf, backend=backend, **kw)
        fast = torch.autograd.grad(lf, (x, w, mf))
    lr = R.margin_cross_entropy(x, w, y, m2=mr, **kw)
    ref = torch.autograd.grad(lr, (x, w, mr))
    assert ref[2].abs().max() > 0 and ref[2][y == -1].abs().max() == 0
    for what, a, b in zip(("dx", "dW", "dm2"), fast, ref, strict=True):
        assert_close(a, b, dtype, f"{backend} {what}")


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_magface_margin_gradient_reaches_the_norm():
    """MagFace's CE gradient flows into a = |x| through m(a): with lambda_g = 0 the radial part of dL/dx
    is not zero inside [l_a, u_a], and it is zero (the clamp) outside."""
    D, C = 32, 50
    x, w, y = make(6, D, C, torch.float64, ignore=False)
    with torch.no_grad():
        x.mul_(torch.tensor([40.0, 60, 80, 5, 200, 50], dtype=torch.float64)[:, None] / x.norm(dim=1, keepdim=True))
    head = MagFace(D, C, lambda_g=0.0, backend="torch").double()
    with torch.no_grad():
        head.weight.copy_(w)
    xa = x.detach().requires_grad_()
    gx = torch.autograd.grad(head(xa, y), xa)[0]
    radial = (gx * R.normalize(x.detach())).sum(1).abs()
    assert (radial[[0, 1, 2, 5]] > 1e-6).all(), radial
    assert (radial[[3, 4]] < 1e-12).all(), radial  # norms 5 and 200 lie outside [10, 110]


# ---- the buffers ---------------------------------------------------------------------------------------------
def test_adaface_buffers_single_valid_row_and_eval_mode():
    D, C = 16, 20
    head = AdaFace(D, C, backend="torch")
    x, _, y = make(3, D, C, torch.float32, ignore=False)
    y = torch.tensor([4, -1, -1])
    head(x.detach(), y)  # one valid row: the mean moves, the std stays (the unbiased std of 1 value is NaN)
    n = float(x[0].detach().norm())
    assert torch.allclose(head.batch_mean, torch.tensor([0.99 * 20 + 0.01 * n]))
    assert torch.equal(head.batch_std, torch.tensor([100.0]))
    head(x.detach(), torch.full((3,), -1))  # none valid: nothing moves, loss 0
    assert torch.allclose(head.batch_mean, torch.tensor([0.99 * 20 + 0.01 * n]))
    head.eval()
    before = (head.batch_mean.clone(), head.batch_std.clone())
    loss = head(x.detach(), torch.tensor([1, 2, 3]))
    assert torch.isfinite(loss) and torch.equal(head.batch_mean, before[0]) and torch.equal(head.batch_std, before[1])
    assert torch.isfinite(head.batch_std).all() and torch.isfinite(head.batch_mean).all()


def test_curricularface_t_moves_in_training_only_and_ignores_ignored_rows():
    D, C = 16, 20
    head = CurricularFace(D, C, backend="torch")
    x, w, y = make(8, D, C, torch.float32, ignore=False)
    with torch.no_grad():
        head.weight.copy_(w)
    y[[2, 5]] = -1
    head(x.detach(), y)
    c = _cos_t(x.detach(), w.detach(), y)[y != -1]
    assert torch.allclose(head.t, 0.01 * c.mean(), atol=1e-7)
    head.eval()
    t = head.t.clone()
    head(x.detach(), y)
    assert torch.equal(head.t, t)


def test_elastic_margins_are_reproducible_and_ordered():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = ElasticArcFace(8, 10, generator=g1, backend="torch")
    b = ElasticArcFace(8, 10, generator=g2, backend="torch")
    x, _, y = make(16, 8, 10, torch.float32, ignore=False)
    first = a.margins(x, y)
    assert torch.equal(first, b.margins(x, y)) and first.std() > 0.01
    assert not torch.equal(first, a.margins(x, y))  # a new draw on every call
    # plus: the paper gives the largest target cosine the smallest margin; the official code permutes
    cos = torch.tensor([0.1, 0.9, 0.5])
    valid = torch.ones(3, dtype=torch.bool)
    ascending = torch.sort(torch.normal(0.5, 0.05, (3,), generator=torch.Generator().manual_seed(2))).values
    paper = R.elastic_margins(cos, valid, 0.5, 0.05, plus=True, generator=torch.Generator().manual_seed(2))
    official = R.elastic_margins(cos, valid, 0.5, 0.05, plus=True, order="official",
                                 generator=torch.Generator().manual_seed(2))  # fmt: skip
    assert torch.equal(paper, ascending[[2, 0, 1]])  # 0.9 -> smallest, 0.5 -> middle, 0.1 -> largest
    assert torch.equal(official, ascending[[1, 2, 0]])  # utils/losses.py: margin_sorted[argsort(cos, desc)]
    from mdkernels.ops._common.margin import elastic_margins

    fused = elastic_margins(cos, valid, 0.5, 0.05, plus=True, order="official",
                            generator=torch.Generator().manual_seed(2))  # fmt: skip
    assert torch.equal(fused, official)


# ---- memory: no B x C (no B x C K) ------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("name", ["adaface", "curricularface", "magface", "magface_fallback", "elastic_arcface_plus",
                                  "elastic_cosface_plus", "subcenter"])  # fmt: skip
def test_no_batch_by_classes_allocation(backend, name):
    """Every new option: tensor m2 (with grad) and m3, easy margin, theta clip and cosine clamp, CurricularFace's
    modulation, the sub-center max."""
    B, D = 64, 16
    C = 60_000 if backend == "torch" else 3_000
    build, prepare, _ = FAMILY[name]
    K = 3 if name == "subcenter" else 1
    dev = device_for(backend)
    x, w, y = (t.detach() for t in make(B, D, C * K, torch.float32, dev))
    y = torch.where(y >= 0, y // K, y)
    head = build(D, C, backend).to(dev)
    prepare(head, x)
    x.requires_grad_()
    with probe.watch() as seen:  # inside the fused ops too
        loss = head(x, y)
        loss.backward()
    limit = max(C * K * D, B * C // 8)  # the weight gradient is the largest tensor
    assert 0 < seen.largest() <= limit, f"{name}: largest allocation {seen.largest()}, B*C = {B * C}"


# ---- bad input ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make_head,match",
    [
        (lambda: AdaFace(8, 4, h=-0.1), "h must be in"),
        (lambda: AdaFace(8, 4, t_alpha=1.5), "t_alpha must be in"),
        (lambda: AdaFace(8, 4, grad="approx"), "grad must be"),
        (lambda: CurricularFace(8, 4, momentum=2.0), "momentum must be in"),
        (lambda: CurricularFace(8, 4, momentum=float("nan")), "momentum must be in"),
        (lambda: ElasticArcFace(8, 4, std=-0.01), "std must be in"),
        (lambda: ElasticCosFace(8, 4, plus=True, plus_order="sorted"), "plus_order must be"),
        (lambda: MagFace(8, 4, l_a=120.0, u_a=110.0), "l_a and u_a"),
        (lambda: MagFace(8, 4, l_m=0.9, u_m=0.8), "l_m and u_m"),
        (lambda: SubCenterArcFace(8, 4, K=0), r"K .* must be an int in \[1, 16\]"),
        (lambda: SubCenterArcFace(8, 4, K=17), r"K .* must be an int in \[1, 16\]"),
        (lambda: AdaFace(8, 4, s=0.0), "s .* must be > 0"),
    ],
)
def test_bad_arguments_name_the_argument(make_head, match):
    with pytest.raises(ValueError, match=match):
        make_head()


def test_bad_functional_family_arguments():
    x, w, y = make(4, 8, 9, torch.float32, ignore=False)
    with pytest.raises(ValueError, match="subcenters=2 must divide the rows of centers"):
        mdkernels.margin_cross_entropy(x, w, y, subcenters=2)
    with pytest.raises(ValueError, match="fallback and easy_margin"):
        mdkernels.margin_cross_entropy(x, w, y, easy_margin=True)
    with pytest.raises(ValueError, match="m3 carries no gradient"):
        mdkernels.margin_cross_entropy(x, w, y, m3=torch.zeros(4, requires_grad=True))
    with pytest.raises(ValueError, match="curricular_t must be"):
        mdkernels.margin_cross_entropy(x, w, y, curricular_t=torch.zeros(2))
    with pytest.raises(ValueError, match="theta_clip must be"):
        mdkernels.margin_cross_entropy(x, w, y, theta_clip=2.0, fallback=False)


def test_magface_norms_outside_the_range_are_clamped():
    """As the official code: a norm outside [l_a, u_a] is clamped (documented), not an error: the loss is
    the loss at the clamped norm and finite."""
    D, C = 16, 12
    x, w, y = make(4, D, C, torch.float64, ignore=False)
    head = MagFace(D, C, backend="torch").double()
    with torch.no_grad():
        head.weight.copy_(w)
    tiny = R.normalize(x.detach()) * 1e-3
    at_l_a = R.normalize(x.detach()) * head.l_a
    with torch.no_grad():
        assert math.isclose(float(head(tiny, y)), float(head(at_l_a, y)), rel_tol=1e-12)
