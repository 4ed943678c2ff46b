"""Cosine top-k (torch with its C++ sweep, Triton) against the exact ``topk(n(Q) @ n(G)^T)``: values, indices,
ties, zero rows, k above G, split galleries, dtypes, memory, the custom op and the bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import FUSED_BACKENDS, TRITON_RUNS, device_for

import mdkernels
from mdkernels import reference as R
from mdkernels.ops._common import chunked

SHAPES = [(1, 500, 1017, 10), (37, 96, 1017, 1), (37, 96, 300, 10), (64, 40, 20, 50)]  # (Q, D, G, k): k > G last


def _inputs(Q, D, G, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    gallery = torch.randn(G, D, generator=g, dtype=torch.float64)
    queries = torch.randn(Q, D, generator=g, dtype=torch.float64)
    queries[: Q // 2] += 3 * gallery[torch.randint(0, G, (Q // 2,), generator=g)]  # queries with a true match
    if G > 4:
        gallery[3] = 0.0  # a zero row: cosine 0 with everything
        gallery[4] = gallery[1]  # a duplicate row: tied cosines, the smaller index first
    if Q > 2:
        queries[1] = 0.0
    return queries.to(device, dtype), gallery.to(device, dtype)


def _check(values, indices, queries, gallery, k, exact_indices=True, tol=1e-12):
    want_v, want_i = R.cosine_topk(queries.double(), gallery.double(), k)
    assert values.shape == indices.shape == (queries.shape[0], min(k, gallery.shape[0]))
    assert indices.dtype == torch.int64
    torch.testing.assert_close(values.double(), want_v, rtol=tol, atol=tol)
    if exact_indices:
        assert torch.equal(indices, want_i)
    else:  # low precision: the cosines at the returned rows are the returned values, in descending order
        cos = (R.normalize(queries.double()) @ R.normalize(gallery.double()).T).gather(1, indices)
        torch.testing.assert_close(cos, values.double(), rtol=tol, atol=tol)
        assert (values[:, 1:] <= values[:, :-1]).all()


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_the_exact_top_k(backend, shape):
    Q, D, G, k = shape
    for dtype in (torch.float64, torch.float32):
        q, g = _inputs(Q, D, G, dtype, device_for(backend))
        v, i = mdkernels.cosine_topk(q, g, k, backend=backend)
        # fp32: equal cosines among the random rows would be a coincidence; the tie of rows 1 and 4 is exact
        _check(v, i, q, g, k, tol=1e-12 if dtype == torch.float64 else 2e-6)


def test_the_cpp_sweep_equals_the_torch_fallback(monkeypatch):
    if chunked.cpu_ext is None:
        pytest.skip("the CPU module (mdkernels._cpu) is not built")
    q, g = _inputs(53, 64, 5000, torch.float32)
    monkeypatch.setattr(mdkernels.ops.cosine_topk.torch_backend, "CHUNK_ELEMENTS", 53 * 700)  # many chunks
    fused = mdkernels.cosine_topk(q, g, 17, backend="torch")
    monkeypatch.setattr(chunked, "USE_CPU_EXT", False)
    plain = mdkernels.cosine_topk(q, g, 17, backend="torch")
    # exact: both run the one CPU GEMM (torch.mm, never a choice by timing), and the sweep scales each score by
    # the gallery row's fp32 inverse norm with one rounding, as scores.mul_ does
    torch.testing.assert_close(fused[0], plain[0], rtol=0, atol=0)
    assert torch.equal(fused[1], plain[1])
    _check(*fused, q, g, 17, tol=2e-6)


@pytest.mark.skipif(not TRITON_RUNS, reason="needs Triton")
@pytest.mark.parametrize("splits", [2, 3])
def test_triton_split_gallery(monkeypatch, splits):
    from mdkernels.ops.cosine_topk import triton_backend

    monkeypatch.setattr(triton_backend, "FORCE_SPLITS", splits)
    q, g = _inputs(37, 96, 1017, torch.float64, device_for("triton"))
    _check(*mdkernels.cosine_topk(q, g, 10, backend="triton"), q, g, 10)


@pytest.mark.skipif(not TRITON_RUNS, reason="needs Triton")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_half_precision(dtype):
    """16-bit rows (the interpreter rounds the normalised operands as a GPU does): the returned rows' cosines
    are the returned values, descending, within the rounding of a 16-bit dot."""
    q, g = _inputs(37, 96, 1017, dtype, device_for("triton"))
    v, i = mdkernels.cosine_topk(q, g, 10, backend="triton")
    _check(v, i, q, g, 10, exact_indices=False, tol=2e-2)
    assert v.dtype == torch.float32


@pytest.mark.slow
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_no_query_by_gallery_tensor(backend):
    """The promise (docs/design.md, "Memory"): one chunk of at most max(2^21, 256 Q, k Q) scores on the torch path,
    a tile per program on Triton, whatever G; seen inside the op (mdkernels.ops._common.probe)."""
    from mdkernels.ops._common import probe
    from mdkernels.ops.cosine_topk import torch_backend

    Q, D, G, k = 200, 32, 30_000, 5
    q, g = _inputs(Q, D, G, torch.float32, device_for(backend))
    with probe.watch() as seen:
        mdkernels.cosine_topk(q, g, k, backend=backend)
    scores = [c for c in seen.created if c[2] != (G, D)]  # the gallery's own normalisation, G x D
    assert scores, "the probe saw nothing"
    cap = max(torch_backend.CHUNK_ELEMENTS, 256 * Q, k * Q)
    assert max(c[1] for c in scores) <= cap < Q * G // 2, sorted(scores, key=lambda c: -c[1])[:3]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_strided_rows_and_large_k(backend):
    q, g = _inputs(21, 70, 500, torch.float64, device_for(backend))
    wide_q = torch.cat([q, q], 1)[:, ::2]  # not contiguous
    gt = g.t().contiguous().t()  # strides (1, G)
    _check(*mdkernels.cosine_topk(wide_q, gt, 7, backend=backend), wide_q, gt, 7)
    v, i = mdkernels.cosine_topk(q, g, 300, backend="auto" if backend == "torch" else "torch")  # k > 256
    _check(v, i, q, g, 300)


@pytest.mark.slow
def test_custom_op_and_compile():
    q, g = _inputs(9, 40, 70, torch.float32)
    torch.library.opcheck(torch.ops.mdkernels.cosine_topk, (q, g, 5, "torch"))
    fn = torch.compile(lambda a, b: mdkernels.cosine_topk(a, b, 5, backend="torch")[0].sum(), fullgraph=True)
    torch.testing.assert_close(fn(q, g), mdkernels.cosine_topk(q, g, 5, backend="torch")[0].sum())


@pytest.mark.parametrize(
    "call, match",
    [(lambda q, g: mdkernels.cosine_topk(q, g, 0), "k must be an int >= 1"),
     (lambda q, g: mdkernels.cosine_topk(q, g, 2.5), "k must be an int >= 1"),
     (lambda q, g: mdkernels.cosine_topk(q, g[:0], 3), "gallery has no rows"),
     (lambda q, g: mdkernels.cosine_topk(q, g[:, :5], 3), "gallery must have 8 columns"),
     (lambda q, g: mdkernels.cosine_topk(q[0], g, 3), "queries must be 2-D"),
     (lambda q, g: mdkernels.cosine_topk(q, g.double(), 3), "dtype"),
     (lambda q, g: mdkernels.cosine_topk(q, g.to("meta"), 3), "gallery is on meta"),
     (lambda q, g: mdkernels.cosine_topk(q.long(), g, 3), "queries must be float"),
     (lambda q, g: mdkernels.cosine_topk(q, g, 3, backend="faiss"), "backend must be one of")],
)  # fmt: skip
def test_bad_input(call, match):
    q, g = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match=match):
        call(q, g)
