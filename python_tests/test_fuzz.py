"""Property-based fuzzing (hypothesis) of every public loss and option on every backend CI has (torch,
Triton interpreted, CUDA emulated) against mdkernels.reference in fp64: the loss and every gradient.

CI runs the ``ci`` profile (conftest.py): derandomized, a bounded number of examples per test.
``pytest python_tests/test_fuzz.py --hypothesis-profile=long`` searches thoroughly by hand.

Each drawn case fixes shapes, options and a seed; the tensors come from the seed, with corner rows
placed by the draw: zero embeddings, rows exactly on (or opposite) a center (cos = +-1), several rows of
one label, ignored rows up to all of them, strided inputs. Where the reference raises a ValueError (a
batch whose Dmax is not positive, say), the fused function must raise one too.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import TRITON_RUNS

import mdkernels
from mdkernels import _cuda_ext
from mdkernels import reference as R

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = pytest.mark.slow  # property-based fuzzing: docs/testing.md's quick tier (-m "not slow") leaves them out

BACKENDS = ["torch"] + (["triton"] if TRITON_RUNS else []) + (["cuda"] if _cuda_ext.emu is not None else [])
F64 = (1e-8, 1e-9)  # fused fp64 against the fp64 reference (rtol, atol x the largest value)
# The emulated CUDA kernels run in fp32: the normalisation backward leaves |dL/dn(x)| eps / |x| in a row,
# and MarginDistillation's margins amplify the teacher cosines' rounding by 1/Dmax, so 1e-3 of the largest
# value (a random soak found 3.4e-4 once); a logic error is O(1)
F32 = (1e-3, 1e-3)
# A row exactly on (or opposite) a center (and every row when D = 1) has cos = +-1 up to the last bit,
# where sin(theta) = sqrt(1 - c^2) turns that bit into sqrt(2 eps) ~ 2e-8 (fp64) of the margin logit: both
# sides are right to within the problem's conditioning there, so those cases compare at this tolerance.
F64_EDGE = (1e-6, 1e-7)


# examples per backend, as multiples of the profile's max_examples (the interpreter and the emulator are slow)
EXAMPLES = {"torch": 10, "triton": 4, "cuda": 3}


def _fuzz(backend, body) -> None:
    """Run ``body(backend, data)`` under hypothesis with the backend's share of examples."""
    n = max(1, int(settings.default.max_examples * EXAMPLES[backend]))
    settings(max_examples=n)(given(data=st.data())(lambda data: body(backend, data)))()


def _tol(dtype, edge=False):
    if dtype != torch.float64:
        return F32
    return F64_EDGE if edge else F64


def _device_ctx(backend):
    return _cuda_ext.emulated() if backend == "cuda" else contextlib.nullcontext()


def _dtype(backend):
    return torch.float32 if backend == "cuda" else torch.float64


def _close(a, b, what, tol):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    assert torch.isfinite(a).all() == torch.isfinite(b).all(), f"{what}: finiteness differs"
    rtol, atol = tol
    # atol relative to the tensor's own largest entry, floored at 1e-3 (a floor of 1.0 once let a halved gradient
    # of size 1e-3 pass; a zero gradient, D = 1 say, is rounding around 0 and compares at the floor's scale)
    scale = float(b.double().abs().max().clamp_min(1e-3)) if b.numel() else 1.0
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


def _size(draw, lo, hi, name, small):
    return draw(st.integers(lo, min(hi, small) if small else hi), label=name)


@st.composite
def embedding_case(draw, backend, C_max=600, K_max=1):
    """(x, w, y, B, D, C, K, edge): x (B, D), w (C K, D), labels with shared and ignored rows and corner
    rows; ``edge`` when a row sits at cos = +-1 to a center."""
    small = {"torch": 0, "triton": 40, "cuda": 24}[backend]  # the interpreter and the emulator are slow
    B = _size(draw, 1, 70, "B", small)
    # fp32 (emulated CUDA) from D = 2: at D = 1 the embedding gradient is 0 exactly, and fp32 leaves
    # |dL/dn(x)| eps / |x| of it, which no fp32 tolerance relative to 0 can hold
    D = _size(draw, 2 if backend == "cuda" else 1, 130, "D", 3 * small if small else 0)
    C = _size(draw, 1, C_max, "C", 5 * small if small else 0)
    K = draw(st.integers(1, K_max), label="K")
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C * K, D, generator=g, dtype=torch.float64)
    scale = 1 + 4 * torch.rand(B, 1, generator=g, dtype=torch.float64)
    x = torch.randn(B, D, generator=g, dtype=torch.float64) * scale
    label_range = draw(st.sampled_from([C, max(1, min(C, B // 2))]), label="label range")  # shared labels
    y = torch.randint(0, label_range, (B,), generator=g)
    ignored = draw(st.sampled_from(["none", "some", "all"]), label="ignored")
    if ignored == "some":
        y[torch.rand(B, generator=g) < 0.3] = -1
    elif ignored == "all":
        y[:] = -1
    # rows at cos = +-1 only in fp64: in fp32 (the emulated CUDA kernels) sqrt(1 - c^2) there is all rounding
    kinds = ["zero"] if backend == "cuda" else ["zero", "on_center", "opposite"]
    corners = draw(st.lists(st.sampled_from(kinds), max_size=3), label="corners")
    for i, kind in enumerate(corners[:B]):
        j = int(y[i]) * K if y[i] >= 0 else 0
        x[i] = 0.0 if kind == "zero" else (1.7 if kind == "on_center" else -0.9) * w[j]
    if draw(st.booleans(), label="strided"):  # non-contiguous inputs: every other column of a wider tensor
        x = torch.stack([x, torch.zeros_like(x)], 2).reshape(B, 2 * D)[:, ::2]
        w = w.t().contiguous().t()
    edge = D == 1 or any(k in ("on_center", "opposite") for k in corners[:B])  # D = 1: every cos is +-1
    return x, w, y, B, D, C, K, edge


def _grads(fn, tensors, weights=None):
    """loss, and the gradient of (weighted) loss w.r.t. each tensor that requires grad (None otherwise)."""
    leaves = [t.detach().requires_grad_(t.requires_grad) for t in tensors]  # detach keeps the strides
    loss = fn(*leaves)
    total = (loss * weights).sum() if weights is not None and loss.dim() else loss.sum()
    need = [t for t in leaves if t.requires_grad]
    grads = iter(torch.autograd.grad(total, need, allow_unused=True)) if need else iter(())
    return loss.detach(), [next(grads) if t.requires_grad else None for t in leaves]


def _compare(fused, ref, tensors, what, tol, weights=None):
    """Run the reference first; a ValueError there must be a ValueError in the fused function too."""
    try:
        expected = _grads(ref, tensors, weights)
    except ValueError:
        with pytest.raises(ValueError):
            _grads(fused, tensors, weights)
        return
    got = _grads(fused, tensors, weights)
    _close(got[0], expected[0], f"{what} loss", tol)
    # An all-zero embedding row's gradient is dL/dn(x) / EPS (1e12 x whatever cancellation leaves of it):
    # finite on both sides, but not a number to compare; the other rows are compared without it.
    zero = tensors[0].detach().flatten(1).abs().amax(1) == 0 if tensors[0].dim() > 1 else None
    for k, (a, b) in enumerate(zip(got[1], expected[1], strict=True)):
        if b is None:
            assert a is None or not a.abs().max() > 0, f"{what}: gradient {k} where the reference has none"
            continue
        assert a is not None, f"{what}: no gradient {k}"
        if k == 0 and zero is not None and zero.any():
            assert torch.isfinite(a[zero]).all() and torch.isfinite(b[zero]).all(), f"{what}: zero row gradient"
            a, b = a[~zero], b[~zero]
        _close(a, b, f"{what} grad {k}", tol)


# ---- margin cross-entropy: every option ----------------------------------------------------------------------
@st.composite
def margin_options(draw, backend, B, K, D):
    kw = {}
    family = draw(st.sampled_from(["arc", "sphere", "free"]), label="margin family")
    if family == "sphere":
        kw["m1"] = draw(st.floats(1.0, 4.0), label="m1")
        kw["m2"] = 0.0
    else:
        kw["m2"] = draw(st.floats(-0.2, 1.2), label="m2")
        kw["fallback"] = draw(st.booleans(), label="fallback")
    if draw(st.booleans(), label="per-row m2") and family != "sphere":
        kw["m2"] = ("rows", draw(st.booleans(), label="m2 requires grad"))
    kw["m3"] = draw(st.floats(0.0, 0.5), label="m3")
    if draw(st.booleans(), label="per-row m3"):
        kw["m3"] = ("rows", False)
    kw["s"] = draw(st.floats(1.0, 64.0), label="s")
    kw["grad"] = draw(st.sampled_from(["exact", "straight_through"]), label="grad")
    if draw(st.booleans(), label="filter"):
        kw["interclass_filter"] = draw(st.floats(-0.3, 0.9), label="filter threshold")
    kw["reduction"] = draw(st.sampled_from(["mean", "sum", "none"]), label="reduction")
    if draw(st.booleans(), label="family options"):
        kw["easy_margin"] = draw(st.booleans(), label="easy_margin")
        if draw(st.booleans(), label="theta clip"):
            kw["theta_clip"] = 1e-3
            kw["cos_clamp"] = 1 - 1e-3
        # CurricularFace's hard-negative test c > phi jumps at a tie; at D = 1 every cosine is +-1 and ties
        # are decided by the last bit (the official code jumps there too), so D = 1 goes without it
        if backend != "cuda" and D > 1 and draw(st.booleans(), label="curricular"):
            kw["curricular_t"] = draw(st.floats(0.0, 1.0), label="t")
    if K > 1:
        kw["subcenters"] = K
    return kw


def _margin_case(draw, backend):
    x, w, y, B, D, C, K, edge = draw(embedding_case(backend, K_max=1 if backend == "cuda" else 4))
    kw = draw(margin_options(backend, B, K, D))
    g = torch.Generator().manual_seed(B * 7919 + D)
    tensors, names = [x.requires_grad_(), w.requires_grad_(draw(st.booleans(), label="trainable centers"))], []
    for key in ("m2", "m3"):
        if isinstance(kw[key], tuple):
            lo, hi = (-0.2, 1.2) if key == "m2" else (0.0, 0.5)
            rows = lo + (hi - lo) * torch.rand(B, generator=g, dtype=torch.float64)
            tensors.append(rows.requires_grad_(kw[key][1]))
            names.append(key)
    return tensors, names, y, kw, edge


def _margin_cross_entropy(backend, data):
    tensors, names, y, kw, edge = _margin_case(data.draw, backend)
    dt = _dtype(backend)
    tensors = [t.detach().to(dt).requires_grad_(t.requires_grad) for t in tensors]
    weights = torch.rand(y.shape[0], dtype=dt, generator=torch.Generator().manual_seed(1))
    opts = {k: v for k, v in kw.items() if k not in names}

    def call(f, extra):
        def fn(x, w, *rows):
            return f(x, w, y, **dict(zip(names, rows, strict=True)), **opts, **extra)

        return fn

    with _device_ctx(backend):
        _compare(call(mdkernels.margin_cross_entropy, {"backend": backend}), call(R.margin_cross_entropy, {}),
                 tensors, f"margin_ce[{backend}] {kw}", _tol(dt, edge), weights)  # fmt: skip


# ---- distillation losses ---------------------------------------------------------------------------------------
def _margin_distillation(backend, data):
    x, w, y, B, D, C, _, edge = data.draw(embedding_case(backend))
    dt = _dtype(backend)
    g = torch.Generator().manual_seed(B + 31 * D)
    # Dmax ~ 0 only in fp64: there the margins m_i = (m_max - m_min) cT_i / Dmax + m_min amplify the teacher
    # cosines' rounding by 1/Dmax, which fp32 (the emulated CUDA kernels) cannot resolve
    signs = ["any", "positive"] + (["near_zero"] if dt == torch.float64 else [])
    sign = data.draw(st.sampled_from(signs), label="teacher cosine")
    t = torch.randn(B, D, generator=g, dtype=torch.float64)
    if sign != "any":  # teacher rows near their centers (positive cosines), or almost orthogonal (Dmax ~ 0)
        on = w[y.clamp_min(0)]
        along = (t * on).sum(1, keepdim=True) / on.pow(2).sum(1, keepdim=True).clamp_min(1e-12)
        t = on + 0.3 * t if sign == "positive" else t - along * on + 1e-7 * on
    kw = dict(s=data.draw(st.floats(1.0, 64.0), label="s"), m_min=data.draw(st.floats(0.0, 0.4), label="m_min"),
              m_max=data.draw(st.floats(0.4, 1.0), label="m_max"),
              fallback=data.draw(st.booleans(), label="fallback"),
              reduction=data.draw(st.sampled_from(["mean", "sum", "none"]), label="reduction"))  # fmt: skip
    if data.draw(st.booleans(), label="fixed dmax"):
        kw["dmax"] = data.draw(st.floats(0.05, 1.0), label="dmax")
    tensors = [x.to(dt).requires_grad_(), w.to(dt), t.to(dt)]
    weights = torch.rand(B, dtype=dt, generator=g)

    def call(f, extra):
        return lambda a, b, c: f(a, b, y, teacher_embeddings=c, **kw, **extra)

    with _device_ctx(backend):
        _compare(call(mdkernels.margin_distillation_loss, {"backend": backend}), call(R.margin_distillation_loss, {}),
                 tensors, f"margin_distillation[{backend}] {kw}", _tol(dt, edge), weights)  # fmt: skip


def _proxyless_kd(backend, data):
    x, w, y, B, D, C, _, edge = data.draw(embedding_case(backend))
    dt = _dtype(backend)
    margin = data.draw(st.sampled_from(["arcface", "cosface", "sphereface"]), label="margin")
    m = data.draw(st.floats(1.0, 4.0) if margin == "sphereface" else st.floats(0.0, 0.8), label="m")
    kw = dict(margin=margin, m=m, s=data.draw(st.floats(1.0, 64.0), label="s"),
              reduction=data.draw(st.sampled_from(["mean", "sum"]), label="reduction"))  # fmt: skip

    def call(f, extra):
        return lambda a, b: f(a, b, y, **kw, **extra)

    with _device_ctx(backend):
        _compare(call(mdkernels.proxyless_kd_loss, {"backend": backend}), call(R.proxyless_kd_loss, {}),
                 [x.to(dt).requires_grad_(), w.to(dt)], f"proxyless[{backend}] {kw}",
                 _tol(dt, edge))  # fmt: skip


def _margin_kd(backend, data):
    x, w, y, B, D, C, _, edge = data.draw(embedding_case(backend))
    dt = _dtype(backend)
    g = torch.Generator().manual_seed(B * 3 + D)
    t = torch.randn(B, D, generator=g, dtype=torch.float64)
    kw = dict(T=data.draw(st.floats(1.0, 8.0), label="T"), alpha=data.draw(st.floats(0.0, 1.0), label="alpha"),
              s=data.draw(st.floats(1.0, 64.0), label="s"), m2=data.draw(st.floats(-0.2, 1.2), label="m2"),
              m3=data.draw(st.floats(0.0, 0.5), label="m3"), fallback=data.draw(st.booleans(), label="fallback"),
              reduction=data.draw(st.sampled_from(["mean", "sum", "none"]), label="reduction"))  # fmt: skip
    tensors = [x.to(dt).requires_grad_(), t.to(dt), w.to(dt).requires_grad_(data.draw(st.booleans(), label="dW"))]
    weights = torch.rand(B, dtype=dt, generator=g)

    def call(f, extra):
        return lambda a, b, c: f(a, b, c, y, **kw, **extra)

    with _device_ctx(backend):
        _compare(call(mdkernels.margin_kd_loss, {"backend": backend}), call(R.margin_kd_loss, {}), tensors,
                 f"margin_kd[{backend}] {kw}", _tol(dt, edge), weights)  # fmt: skip


def _angular_distillation(backend, data):
    dt = _dtype(backend)
    B = data.draw(st.integers(1, {"torch": 70, "triton": 40, "cuda": 12}[backend]), label="B")
    D = data.draw(st.integers(1, 130 if backend == "torch" else 64), label="D")
    shape = data.draw(st.sampled_from([(B, D), (B, 3, 5, 7), (B, 1, 2, 2)]), label="shape")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    s = torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.randn(shape, generator=g, dtype=torch.float64)
    corner = data.draw(st.sampled_from(["none", "zero_student", "zero_teacher", "equal", "opposite"]), label="rows")
    if corner == "zero_student":
        s[0] = 0
    elif corner == "zero_teacher":
        t[0] = 0
    elif corner in ("equal", "opposite"):
        t[0] = (2.5 if corner == "equal" else -2.5) * s[0]
    kw = dict(p=data.draw(st.sampled_from([1.0, 2.0, 3.5]), label="p"))
    if len(shape) == 4:
        kw["per"] = data.draw(st.sampled_from(["sample", "position"]), label="per")

    def call(f, extra):
        return lambda a, b: f(a, b, **kw, **extra)

    with _device_ctx(backend):
        _compare(call(mdkernels.angular_distillation_loss, {"backend": backend}),
                 call(R.angular_distillation_loss, {}), [s.to(dt).requires_grad_(), t.to(dt)],
                 f"angular[{backend}] {shape} {kw}", _tol(dt))  # fmt: skip


def _triplet_distillation(backend, data):
    dt = _dtype(backend)
    B = data.draw(st.integers(1, 40 if backend == "torch" else 16), label="B")
    D = data.draw(st.integers(1, 130 if backend == "torch" else 64), label="D")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    s = torch.randn(B, D, generator=g, dtype=torch.float64)
    t = torch.randn(B, D, generator=g, dtype=torch.float64)
    duplicate = data.draw(st.booleans(), label="duplicate rows")
    if duplicate:
        s[B // 2], t[B // 2] = s[0], t[0]
    kw = dict(distance=data.draw(st.sampled_from(["l2", "angle"]), label="distance"),
              m_min=data.draw(st.floats(0.0, 0.4), label="m_min"),
              m_max=data.draw(st.floats(0.4, 1.0), label="m_max"))  # fmt: skip
    if data.draw(st.booleans(), label="explicit triplets"):
        n = data.draw(st.integers(0, 30), label="N")
        trip = torch.randint(0, B, (n, 3), generator=g)  # degenerate ones too (a == p, p == n)
        args = (trip,)
    else:
        labels = torch.randint(0, data.draw(st.integers(1, 6), label="classes"), (B,), generator=g)
        if duplicate:  # a duplicated row keeps its label: equal rows of two classes tie every mining rule
            labels[B // 2] = labels[0]
        if data.draw(st.booleans(), label="ignored"):
            labels[torch.rand(B, generator=g) < 0.3] = -1
        # hard and semihard mining compare distances, and at D = 1 (rows +-1) those all tie: left to "all"
        minings = ["all", "hard", "semihard"] if D > 1 else ["all"]
        kw.update(labels=labels, mining=data.draw(st.sampled_from(minings), label="mining"))
        args = ()

    def call(f, extra):
        return lambda a, b: f(a, b, *args, **kw, **extra)

    _compare(call(mdkernels.triplet_distillation_loss, {"backend": backend}), call(R.triplet_distillation_loss, {}),
             [s.to(dt).requires_grad_(), t.to(dt)], f"triplet[{backend}] {kw.get('mining')}", F64)  # fmt: skip


def _adadistill(backend, data):
    """AdaDistill: the loss, the student's gradient and the centers after the update; classes shared by
    several rows (composed in batch order), ignored rows, teachers of any sign, centers of any scale."""
    x, w, y, B, D, C, _, edge = data.draw(embedding_case(backend))
    dt = _dtype(backend)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="teacher seed"))
    t = torch.randn(B, D, generator=g, dtype=torch.float64)
    if data.draw(st.booleans(), label="teacher near its center"):
        t = t * 0.3 + w[y.clamp_min(0)]
    w = w * data.draw(st.sampled_from([0.01, 1.0, 30.0]), label="center scale")
    kw = dict(margin=data.draw(st.sampled_from(["arcface", "cosface"]), label="margin"),
              s=data.draw(st.floats(1.0, 64.0), label="s"))  # fmt: skip
    if data.draw(st.booleans(), label="explicit m"):
        kw["m"] = data.draw(st.floats(0.0, 0.8), label="m")
    moved = {}

    def fused(a, b):
        moved["w"] = w.to(dt).clone()
        return mdkernels.adadistill_loss(a, b, moved["w"], y, backend=backend, **kw)

    with _device_ctx(backend):
        _compare(fused, lambda a, b: R.adadistill_loss(a, b, w.to(dt), y, **kw)[0], [x.to(dt).requires_grad_(),
                 t.to(dt)], f"adadistill[{backend}] {kw}", _tol(dt, edge))  # fmt: skip
    if "w" in moved:
        want, _ = R.adadistill_update(w.to(dt), x.to(dt), t.to(dt), y)
        _close(moved["w"], want, f"adadistill[{backend}] centers", _tol(dt, edge))


# ---- the tests: one per loss and backend ----------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_margin_cross_entropy(backend):
    _fuzz(backend, _margin_cross_entropy)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_margin_distillation(backend):
    _fuzz(backend, _margin_distillation)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_proxyless_kd(backend):
    _fuzz(backend, _proxyless_kd)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cuda"])  # margin KD has no CUDA kernel
def test_fuzz_margin_kd(backend):
    _fuzz(backend, _margin_kd)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_angular_distillation(backend):
    _fuzz(backend, _angular_distillation)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cuda"])  # the triplet op has no CUDA kernel
def test_fuzz_triplet_distillation(backend):
    _fuzz(backend, _triplet_distillation)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fuzz_adadistill(backend):
    _fuzz(backend, _adadistill)
