"""Every public module of ``mdkernels.nn`` and every public loss function against the eager reference, from one
table: the loss and every gradient (the embeddings, the centers where they train, a projection or an adapter where
the module has one, the moved centers of AdaDistill), with ignored rows, in fp64 and fp32, on every backend here.
A public name without a row fails ``test_every_public_name_has_a_row``. (The margin family's heads run through
``test_margin_family.py``'s own table, corners and buffers included; sharding and Partial FC sampling are in
``test_distributed.py``.)"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from conftest import FUSED_BACKENDS, assert_close

import mdkernels
from mdkernels import _cuda_ext
from mdkernels import reference as R
from mdkernels.ops import OPS

B, D, C = 13, 24, 61
BACKENDS = [*FUSED_BACKENDS] + (["cuda"] if _cuda_ext.emu is not None else [])


def _data(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g)
    x = torch.randn(B, D, generator=g, dtype=torch.float64) + 2.5 * w[y] * torch.rand(B, 1, generator=g,
                                                                                      dtype=torch.float64)  # fmt: skip
    t = w[y] / w[y].norm(dim=1, keepdim=True) + 0.3 * torch.randn(B, D, generator=g, dtype=torch.float64)
    y[2] = -1
    y[7] = y[5]  # a class twice in the batch
    return x.to(dtype), w.to(dtype), y, t.to(dtype)


def _grads(loss, tensors):
    return list(torch.autograd.grad(loss, tensors))


def _pair(what, fused_loss, fused_tensors, ref_loss, ref_tensors):
    """[(what, fused, reference)] for the loss and the gradient of each tensor."""
    out = [(f"{what} loss", fused_loss.detach(), ref_loss.detach())]
    for (name, a), b in zip(fused_tensors, _grads(ref_loss, ref_tensors), strict=True):
        out.append((f"{what} d{name}", a, b))
    return out


def _leaf(t):
    return t.detach().clone().requires_grad_()


# ---- one row per public name: build the module (or call the function) on ``backend``, and the reference -----------
def _head(cls, margins, **kw):
    def row(backend, dtype):
        x, w, y, _ = _data(dtype)
        head = cls(D, C, backend=backend, **kw).to(dtype)
        with torch.no_grad():
            head.weight.copy_(w)
        xa = _leaf(x)
        loss = head(xa, y)
        gx, gw = _grads(loss, [xa, head.weight])
        xr, wr = _leaf(x), _leaf(w)
        ref = R.margin_cross_entropy(xr, wr, y, s=head.s, **margins)
        return _pair(cls.__name__, loss, [("x", gx), ("W", gw)], ref, [xr, wr])

    return row


def _pml(cls, margins_of):
    def row(backend, dtype):
        x, w, y, _ = _data(dtype)
        head = cls(C, D, backend=backend).to(dtype)
        with torch.no_grad():
            head.W.copy_(w.T)
        xa = _leaf(x)
        loss = head(xa, y)
        gx, gW = _grads(loss, [xa, head.W])
        xr, wr = _leaf(x), _leaf(w)
        ref = R.margin_cross_entropy(xr, wr, y, s=head.scale, **margins_of(head))
        return _pair(cls.__name__, loss, [("x", gx), ("W", gW.T)], ref, [xr, wr])

    return row


def _family(name):
    def row(backend, dtype):
        from test_margin_family import _run_family

        out, ref, _, _ = _run_family(name, backend, dtype, (B, D, C))
        return [(f"{name} {w}", a, b) for w, a, b in zip(("loss", "dx", "dW"), out, ref, strict=True)]

    return row


def _margin_distillation(module):
    def row(backend, dtype):
        x, w, y, t = _data(dtype)
        xa = _leaf(x)
        if module:
            loss = mdkernels.nn.MarginDistillation(w, backend=backend)(xa, y, teacher_embeddings=t)
        else:
            loss = mdkernels.margin_distillation_loss(xa, w, y, teacher_embeddings=t, backend=backend)
        xr = _leaf(x)
        ref = R.margin_distillation_loss(xr, w, y, teacher_embeddings=t)
        return _pair("MarginDistillation", loss, [("x", _grads(loss, [xa])[0])], ref, [xr])

    return row


def _proxyless(module, projection=False):
    def row(backend, dtype):
        x, w, y, _ = _data(dtype)
        xa = _leaf(x)
        if not module:
            loss = mdkernels.proxyless_kd_loss(xa, w, y, margin="cosface", m=0.35, backend=backend)
            xr = _leaf(x)
            ref = R.proxyless_kd_loss(xr, w, y, margin="cosface", m=0.35)
            return _pair("proxyless_kd_loss", loss, [("x", _grads(loss, [xa])[0])], ref, [xr])
        kd = mdkernels.nn.ProxylessKD(w, m=0.45, projection=projection, embedding_size=D if projection else None,
                                      backend=backend).to(dtype)  # fmt: skip
        loss = kd(xa, y)
        params = [xa] + ([kd.projection.weight] if projection else [])
        gs = _grads(loss, params)
        xr = _leaf(x)
        pr = _leaf(kd.projection.weight) if projection else None
        ref = R.proxyless_kd_loss(xr @ pr.T if projection else xr, w, y, m=0.45)
        names = ["x"] + (["projection"] if projection else [])
        return _pair("ProxylessKD", loss, list(zip(names, gs, strict=True)), ref, [xr] + ([pr] if projection else []))

    return row


def _angular(module):
    def row(backend, dtype):
        x, _, _, t = _data(dtype)
        if not module:
            xa = _leaf(x)
            loss = mdkernels.angular_distillation_loss(xa, t, p=2, backend=backend)
            xr = _leaf(x)
            return _pair("angular_distillation_loss", loss, [("x", _grads(loss, [xa])[0])],
                         R.angular_distillation_loss(xr, t, p=2), [xr])  # fmt: skip
        g = torch.Generator().manual_seed(3)
        s_map = torch.randn(B, 6, 3, 3, generator=g, dtype=torch.float64).to(dtype)
        t_map = torch.randn(B, 8, 3, 3, generator=g, dtype=torch.float64).to(dtype)
        mod = mdkernels.nn.AngularDistillation(channels=[(6, 8), (D, D)], weights=[0.5, 7.0], p=2,
                                               backend=backend).to(dtype)  # fmt: skip
        xa, sa = _leaf(x), _leaf(s_map)
        loss = mod([sa, xa], [t_map, t])
        gs = _grads(loss, [xa, sa, mod.adapters[0].weight])
        xr, sr, ar = _leaf(x), _leaf(s_map), _leaf(mod.adapters[0].weight)
        ref = 0.5 * R.angular_distillation_loss(torch.nn.functional.conv2d(sr, ar), t_map) + \
            7.0 * R.angular_distillation_loss(xr, t)  # fmt: skip
        return _pair("AngularDistillation", loss, list(zip(("x", "map", "adapter"), gs, strict=True)), ref,
                     [xr, sr, ar])  # fmt: skip

    return row


def _triplet(module):
    def row(backend, dtype):
        x, _, _, t = _data(dtype)
        labels = torch.arange(B) % 4
        labels[3] = -1
        xa = _leaf(x)
        if module:
            loss = mdkernels.nn.TripletDistillation(mining="all", distance="angle", backend=backend)(xa, t, labels)
        else:
            loss = mdkernels.triplet_distillation_loss(xa, t, labels=labels, distance="angle", backend=backend)
        xr = _leaf(x)
        ref = R.triplet_distillation_loss(xr, t, labels=labels, mining="all", distance="angle")
        return _pair("TripletDistillation", loss, [("x", _grads(loss, [xa])[0])], ref, [xr])

    return row


def _margin_kd(module, trainable=False):
    def row(backend, dtype):
        x, w, y, t = _data(dtype)
        xa = _leaf(x)
        if module:
            kd = mdkernels.nn.MarginKD(w, T=3.0, alpha=0.7, trainable_centers=trainable, backend=backend).to(dtype)
            loss = kd(xa, t, y)
            params = [xa] + ([kd.centers] if trainable else [])
        else:
            loss = mdkernels.margin_kd_loss(xa, t, w, y, T=3.0, alpha=0.7, backend=backend)
            params = [xa]
        gs = _grads(loss, params)
        xr, wr = _leaf(x), _leaf(w)
        ref = R.margin_kd_loss(xr, t, wr if trainable else w, y, T=3.0, alpha=0.7)
        names = ["x"] + (["W"] if trainable else [])
        return _pair("MarginKD", loss, list(zip(names, gs, strict=True)), ref, [xr] + ([wr] if trainable else []))

    return row


def _adadistill(module):
    def row(backend, dtype):
        x, w, y, t = _data(dtype)
        w = 0.1 * w
        xa = _leaf(x)
        if module:
            mod = mdkernels.nn.AdaDistill(D, C, backend=backend).to(dtype)
            with torch.no_grad():
                mod.weight.copy_(w)
            loss = mod(xa, t, y)
            moved = mod.weight
        else:
            moved = w.clone()
            loss = mdkernels.adadistill_loss(xa, t, moved, y, backend=backend)
        xr = _leaf(x)
        ref, want = R.adadistill_loss(xr, t, w, y)
        return _pair("AdaDistill", loss, [("x", _grads(loss, [xa])[0])], ref, [xr]) + [("AdaDistill centers", moved,
                                                                                       want)]  # fmt: skip

    return row


def _margin_ce_function(backend, dtype):
    x, w, y, _ = _data(dtype)
    m2 = torch.full((B,), 0.4, dtype=dtype).requires_grad_()
    xa, wa = _leaf(x), _leaf(w)
    loss = mdkernels.margin_cross_entropy(xa, wa, y, m2=m2, m3=0.1, interclass_filter=0.8, backend=backend)
    gs = _grads(loss, [xa, wa, m2])
    xr, wr, mr = _leaf(x), _leaf(w), _leaf(m2)
    ref = R.margin_cross_entropy(xr, wr, y, m2=mr, m3=0.1, interclass_filter=0.8)
    return _pair("margin_cross_entropy", loss, list(zip(("x", "W", "m2"), gs, strict=True)), ref, [xr, wr, mr])


def _l2_normalize(backend, dtype):
    x, _, _, _ = _data(dtype)
    xa, xr = _leaf(x), _leaf(x)
    y = mdkernels.l2_normalize(xa)
    ref = R.normalize(xr)
    weight = torch.linspace(-1, 1, x.numel(), dtype=x.dtype).view_as(x)
    return _pair("l2_normalize", (y * weight).sum(), [("x", _grads((y * weight).sum(), [xa])[0])],
                 (ref * weight).sum(), [xr])  # fmt: skip


def _cosine_topk(name):
    def row(backend, dtype):
        x, w, _, _ = _data(dtype)
        fn = getattr(mdkernels, name)
        values, indices = fn(x, w, 5, backend=backend)
        want_v, want_i = R.cosine_topk(x.double(), w.double(), 5)
        return [(f"{name} values", values, want_v), (f"{name} indices", indices.double(), want_i.double())]

    return row


ROWS = {
    # modules
    "ArcFace": _head(mdkernels.nn.ArcFace, dict(m2=0.5)),
    "CosFace": _head(mdkernels.nn.CosFace, dict(m2=0.0, m3=0.35)),
    "SphereFace": _head(mdkernels.nn.SphereFace, dict(m1=1.35, m2=0.0)),
    "CombinedMargin": _head(mdkernels.nn.CombinedMargin, dict(m1=1.0, m2=0.3, m3=0.2), m1=1.0, m2=0.3, m3=0.2),
    "PartialFCHead": _head(mdkernels.nn.PartialFCHead, dict(m2=0.5, grad="straight_through", fallback=False,
                                                             interclass_filter=0.6),
                           interclass_filtering_threshold=0.6),  # fmt: skip
    "ArcFaceLoss": _pml(mdkernels.nn.ArcFaceLoss, lambda h: dict(m2=math.radians(h.margin), fallback=True)),
    "CosFaceLoss": _pml(mdkernels.nn.CosFaceLoss, lambda h: dict(m2=0.0, m3=h.margin)),
    "AdaFace": _family("adaface"),
    "CurricularFace": _family("curricularface"),
    "MagFace": _family("magface"),
    "ElasticArcFace": _family("elastic_arcface_plus"),
    "ElasticCosFace": _family("elastic_cosface_plus"),
    "SubCenterArcFace": _family("subcenter"),
    "MarginDistillation": _margin_distillation(True),
    "ProxylessKD": _proxyless(True, projection=True),
    "AngularDistillation": _angular(True),
    "TripletDistillation": _triplet(True),
    "MarginKD": _margin_kd(True, trainable=True),
    "AdaDistill": _adadistill(True),
    # functions
    "margin_cross_entropy": _margin_ce_function,
    "margin_distillation_loss": _margin_distillation(False),
    "proxyless_kd_loss": _proxyless(False),
    "angular_distillation_loss": _angular(False),
    "triplet_distillation_loss": _triplet(False),
    "margin_kd_loss": _margin_kd(False),
    "adadistill_loss": _adadistill(False),
    "l2_normalize": _l2_normalize,
    "cosine_topk": _cosine_topk("cosine_topk"),
    "cosine_topk_search": _cosine_topk("cosine_topk_search"),
}
# not losses: the fused center update is checked against torch.optim's step for every head in test_center_update.py
NOT_LOSSES = {"MarginCEStats", "__version__", "check_values", "info", "nn", "reference", "CenterUpdateHandle",
              "fuse_center_update"}  # fmt: skip
# where a backend has no kernel for a row (the registry's lacks): the CUDA C++ kernels have neither the sub-center
# max nor CurricularFace's modulation, margin KD, triplet or cosine top-k; l2_normalize takes no backend
SKIP = {("cuda", n) for n in ("CurricularFace", "SubCenterArcFace", "MarginKD", "margin_kd_loss", "TripletDistillation",
                              "triplet_distillation_loss", "cosine_topk", "cosine_topk_search")}  # fmt: skip


def test_every_public_name_has_a_row():
    public = set(mdkernels.nn.__all__) | (set(mdkernels.__all__) - NOT_LOSSES)
    assert public == set(ROWS), f"without a row: {sorted(public - set(ROWS))}; stale rows: {sorted(set(ROWS) - public)}"
    functions = {f for op in OPS.values() for f in op.functions}
    assert functions - {"cosine_topk_search"} <= set(ROWS)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(ROWS))
def test_against_the_reference(name, backend, dtype):
    if (backend, name) in SKIP or (backend == "cuda" and dtype == torch.float64):
        pytest.skip("no kernel for it in this backend" if (backend, name) in SKIP else "the CUDA kernels take no fp64")
    if name == "l2_normalize" and backend != "torch":
        pytest.skip("l2_normalize takes no backend (torch, or the CUDA row kernel on a GPU)")
    ctx = _cuda_ext.emulated() if backend == "cuda" else contextlib.nullcontext()
    with ctx:
        pairs = ROWS[name](backend, dtype)
    for what, a, b in pairs:
        assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        if "indices" in what:
            assert torch.equal(a, b), what
        else:
            # the emulated CUDA kernels run fp32 with fp32 inputs; fp32 against an fp64 reference elsewhere
            assert_close(a, b.to(a.dtype), dtype if backend != "cuda" else torch.float32, f"{name}[{backend}] {what}")
