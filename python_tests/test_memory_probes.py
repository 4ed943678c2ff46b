"""The memory contracts, checked inside the ops (mdkernels.ops._common.probe): every tensor a fused path creates,
in its forward and its backward, the custom ops' own implementations included.

The promises (docs/design.md, "Memory"):

* margin ops: nothing of ``B x C`` logits. The torch path holds one chunk of at most ``max(CHUNK_ELEMENTS, 256 B)``
  logits at a time, Triton one tile per program; the shapes here make ``B x C`` larger than a chunk, so a
  ``B x C`` tensor would show;
* no copy of the centers: trainable centers get one ``C x D`` tensor, their gradient, and frozen ones none (a
  ``(D, C)`` pytorch-metric-learning parameter and 16-bit operands under autocast included);
* cosine top-k: at most ``max(2^21, 256 Q, k Q)`` scores at a time on the torch path, whatever ``G``;
* triplet distillation "all": nothing of ``B^3``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import FUSED_BACKENDS

import mdkernels
from mdkernels.ops._common import chunked, probe
from mdkernels.ops.cosine_topk import torch_backend as topk_torch

B, D, C = 64, 16, 20_000  # B x C = 1.28M logits: above a torch chunk (2^19) and the C x D of the centers (320k)


def _inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g, dtype=dtype, requires_grad=True)
    y = torch.randint(0, C, (B,), generator=g)
    y[:3] = -1
    return x, y


def _chunk_cap() -> int:
    return max(chunked.CHUNK_ELEMENTS, 256 * B)


def _check_margin(seen: probe.Seen, trainable: bool, what: str) -> None:
    assert seen.created, f"{what}: the probe saw nothing: the op did not report from inside"
    big = [c for c in seen.at_least(B * C // 2) if tuple(sorted(c[2])) != (D, C)]
    assert not big, f"{what}: a tensor of B x C size: {big[:3]}"
    assert max((c[1] for c in seen.created if tuple(sorted(c[2])) != (D, C)), default=0) <= _chunk_cap(), what
    centers = seen.shaped((C, D))
    assert len(centers) == (1 if trainable else 0), f"{what}: C x D tensors {centers} (the gradient only)"


HEADS = {
    "ArcFace": lambda b: mdkernels.nn.ArcFace(D, C, backend=b),
    "CosFace": lambda b: mdkernels.nn.CosFace(D, C, backend=b),
    "SphereFace": lambda b: mdkernels.nn.SphereFace(D, C, backend=b),
    "CombinedMargin": lambda b: mdkernels.nn.CombinedMargin(D, C, m1=1.0, m2=0.3, m3=0.2, backend=b),
    "PartialFCHead": lambda b: mdkernels.nn.PartialFCHead(D, C, backend=b),
    "ArcFaceLoss": lambda b: mdkernels.nn.ArcFaceLoss(C, D, backend=b),
    "CosFaceLoss": lambda b: mdkernels.nn.CosFaceLoss(C, D, backend=b),
    "AdaFace": lambda b: mdkernels.nn.AdaFace(D, C, backend=b),
    "CurricularFace": lambda b: mdkernels.nn.CurricularFace(D, C, backend=b),
    "MagFace": lambda b: mdkernels.nn.MagFace(D, C, backend=b),
    "ElasticArcFace": lambda b: mdkernels.nn.ElasticArcFace(D, C, backend=b),
    "ElasticCosFace": lambda b: mdkernels.nn.ElasticCosFace(D, C, backend=b),
}


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("name", list(HEADS))
def test_heads_allocate_no_logits_matrix_and_no_copy_of_the_centers(name, backend):
    if backend == "triton" and name not in ("ArcFace", "ArcFaceLoss", "CurricularFace", "MagFace"):
        pytest.skip("the interpreter is slow: these share the four heads' Triton paths")
    head = HEADS[name](backend)
    x, y = _inputs()
    with probe.watch() as seen:
        head(x, y).backward()
    _check_margin(seen, True, f"{name}[{backend}]")


@pytest.mark.parametrize(("name", "backend"), [
    *((n, b) for n in ("ArcFace", "ArcFaceLoss", "CurricularFace", "MagFace", "ElasticCosFace") for b in FUSED_BACKENDS
      if b != "triton" or n in ("ArcFace", "ArcFaceLoss")),
    *(pytest.param(n, "triton", marks=pytest.mark.slow) for n in ("CurricularFace", "MagFace", "ElasticCosFace")
      if "triton" in FUSED_BACKENDS),
])  # the interpreter is slow: three heads' Triton runs in the full suite only
def test_fused_center_update_allocates_no_center_gradient(name, backend):
    """With mdkernels.fuse_center_update, after the step that created the optimizer's state, a backward creates no
    C x D tensor at all: the gradient exists one chunk (torch), tile (Triton, D resident) or window at a time."""
    head = HEADS[name](backend)
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    handle = mdkernels.fuse_center_update(head, opt)
    x, y = _inputs()
    head(x, y).backward()
    opt.step()
    with probe.watch() as seen:
        head(x, y).backward()
    handle.remove()
    assert seen.created, "the probe saw nothing"
    assert not seen.holding(C, D), f"{name}[{backend}]: {seen.holding(C, D)[:3]}"
    assert seen.largest() <= _chunk_cap(), name
    assert head.weight.grad is None if hasattr(head, "weight") else head.W.grad is None


@pytest.mark.slow
def test_sub_center_head_allocates_no_logits_matrix():
    head = mdkernels.nn.SubCenterArcFace(D, C // 3, K=3, backend="torch")
    x, y = _inputs()
    y = y.clamp(max=C // 3 - 1)
    with probe.watch() as seen:
        head(x, y).backward()
    assert not seen.at_least(B * C // 2) and len(seen.shaped((C // 3 * 3, D))) == 1


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_autocast_makes_no_16_bit_copy_of_the_centers(backend):
    head = mdkernels.nn.ArcFace(D, C, backend=backend)
    x, y = _inputs()
    with probe.watch() as seen, torch.autocast("cpu", dtype=torch.bfloat16):
        head(x, y).backward()
    _check_margin(seen, True, f"autocast[{backend}]")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("loss", ["margin_distillation", "proxyless_kd", "adadistill", "margin_kd"])
def test_distillation_losses_on_frozen_centers_copy_nothing(loss, backend):
    if backend == "triton" and loss in ("proxyless_kd",):
        pytest.skip("ProxylessKD runs MarginDistillation's frozen-centers path on Triton, checked above")
    x, y = _inputs()
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(C, D, generator=g)
    t = torch.randn(B, D, generator=g)
    calls = {
        "margin_distillation": lambda: mdkernels.margin_distillation_loss(x, centers, y, teacher_embeddings=t,
                                                                         backend=backend),
        "proxyless_kd": lambda: mdkernels.proxyless_kd_loss(x, centers, y, backend=backend),
        "adadistill": lambda: mdkernels.adadistill_loss(x, t, centers, y, backend=backend),
        "margin_kd": lambda: mdkernels.margin_kd_loss(x, t, centers, y, backend=backend),
    }  # fmt: skip
    with probe.watch() as seen:
        calls[loss]().backward()
    _check_margin(seen, False, f"{loss}[{backend}]")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_margin_kd_with_trainable_centers_has_one_gradient(backend):
    x, y = _inputs()
    w = torch.randn(C, D, requires_grad=True)
    with probe.watch() as seen:
        mdkernels.margin_kd_loss(x, torch.randn(B, D), w, y, backend=backend).backward()
    _check_margin(seen, True, f"margin_kd trainable[{backend}]")


@pytest.mark.parametrize("backend", [b for b in FUSED_BACKENDS if b != "triton"])
def test_cosine_topk_holds_one_chunk_whatever_the_gallery(backend):
    """The torch path's chunk cap at a gallery 43x the chunk. (Triton's tile per program: test_cosine_topk.py's
    test_no_query_by_gallery_tensor, the same promise at a smaller gallery the interpreter walks faster.)"""
    Q, G, k = 48, 120_000, 10  # Q x G = 5.8M scores; a torch chunk is 2^21
    g = torch.Generator().manual_seed(0)
    queries, gallery = torch.randn(Q, 8, generator=g), torch.randn(G, 8, generator=g)
    with probe.watch() as seen:
        mdkernels.cosine_topk(queries, gallery, k, backend=backend)
    assert seen.created, "the probe saw nothing"
    scores = [c for c in seen.created if c[1] != G * 8]  # the gallery's own normalisation is G x D
    cap = max(topk_torch.CHUNK_ELEMENTS, 256 * Q, k * Q)
    assert max(c[1] for c in scores) <= cap < Q * G // 2, sorted(scores, key=lambda c: -c[1])[:3]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_triplet_all_allocates_nothing_cubic(backend):
    n = 96  # B^3 = 884,736; B^2 = 9,216
    g = torch.Generator().manual_seed(0)
    s = torch.randn(n, 12, generator=g, requires_grad=True)
    labels = torch.arange(n) % 8
    with probe.watch() as seen:
        mdkernels.triplet_distillation_loss(s, torch.randn(n, 12, generator=g), labels=labels,
                                            backend=backend).backward()  # fmt: skip
    assert seen.created and seen.largest() < n**3 // 8, sorted(seen.created, key=lambda c: -c[1])[:3]


def test_the_probe_sees_inside_a_custom_op():
    """A dispatch mode around a custom op sees its outputs only; the probe also sees what the implementation
    creates inside: here the forward's per-chunk logits."""
    x, y = _inputs()
    w = torch.randn(C, D)
    with probe.watch() as seen:
        mdkernels.margin_cross_entropy(x, w, y, backend="torch")
    inner = [c for c in seen.created if c[0] == "aten.mm.default"]
    assert inner and all(c[2][0] == B for c in inner), seen.created[:5]
