"""AdaDistill (ECCV 2024): the reference against the official head's rule, the fused op (torch, Triton, emulated
CUDA) against the reference over several steps (loss, student gradient, centers), the module, the sharded head
and the bad input."""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import FUSED_BACKENDS, assert_close, device_for

import mdkernels
from mdkernels import _cuda_ext
from mdkernels import reference as R

BACKENDS = FUSED_BACKENDS + (["cuda"] if _cuda_ext.emu is not None else [])


def official_head(kernel, student, teacher, label, margin="arcface", s=64.0, m=0.45):
    """The official head's forward as its code computes it (kernel (D, C), no ignored rows, distinct labels),
    re-typed from the paper's rule for an independent check: ``(logits, new kernel)``."""
    kernel = kernel.clone()
    sn = student / student.norm(dim=1, keepdim=True)
    tn = teacher / teacher.norm(dim=1, keepdim=True)
    cos_st = torch.nn.functional.cosine_similarity(sn, tn).clamp(-1, 1)
    lam = torch.nn.functional.cosine_similarity(kernel[:, label].T, tn).clamp(1e-6, 1)
    a = (cos_st * lam).clamp(1e-6, 1.0)
    kernel[:, label] = a * kernel[:, label] + (1 - a) * tn.T
    cos = (sn @ (kernel / kernel.norm(dim=0, keepdim=True))).clamp(-1, 1)
    hot = torch.nn.functional.one_hot(label, kernel.shape[1]).bool()
    if margin == "arcface":
        logits = torch.where(hot, torch.cos(torch.acos(cos) + m), cos) * s
    else:
        logits = torch.where(hot, cos - m, cos) * s
    return logits, kernel


def inputs(B, D, C, dtype=torch.float64, device="cpu", seed=0, duplicates=True, ignore=True):
    g = torch.Generator().manual_seed(seed)
    centers = 0.01 * torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (B,), generator=g) if duplicates else torch.randperm(C, generator=g)[:B]
    t = torch.randn(C, D, generator=g, dtype=torch.float64)[y] + 0.3 * torch.randn(B, D, generator=g,
                                                                                     dtype=torch.float64)
    x = t + 0.8 * torch.randn(B, D, generator=g, dtype=torch.float64)  # student near its teacher
    if ignore and B > 3:
        y[2] = -1
    return (x.to(device, dtype).requires_grad_(), t.to(device, dtype), centers.to(device, dtype), y.to(device))


@pytest.mark.parametrize("margin", ["arcface", "cosface"])
def test_reference_is_the_official_head_on_distinct_labels(margin):
    x, t, w, y = inputs(24, 40, 70, duplicates=False, ignore=False)
    m = 0.45 if margin == "arcface" else 0.35
    logits, kernel = official_head(w.T.clone(), x.detach(), t, y, margin, m=m)
    want = torch.nn.functional.cross_entropy(logits, y)
    loss, new = R.adadistill_loss(x, t, w, y, margin=margin)
    torch.testing.assert_close(new, kernel.T, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)


def test_reference_composes_a_class_in_batch_order():
    """Two rows of one class: both alphas from the pre-batch center, applied first-row-first."""
    x, t, w, _ = inputs(2, 16, 5, ignore=False)
    y = torch.tensor([3, 3])
    new, alpha = R.adadistill_update(w, x.detach(), t, y)
    tn = t / t.norm(dim=1, keepdim=True)
    one = alpha[0] * w[3] + (1 - alpha[0]) * tn[0]
    torch.testing.assert_close(new[3], alpha[1] * one + (1 - alpha[1]) * tn[1])
    assert torch.equal(new[:3], w[:3]) and torch.equal(alpha, R.adadistill_alpha(x.detach(), t, w, y))


def _steps(fn, x0, t, w0, y, steps=3, lr=0.5):
    """Three SGD steps on the student rows through ``fn(x, t, w, y) -> (loss, centers after)``:
    the losses, the student gradients and the centers of every step."""
    x = x0.detach().clone().requires_grad_()
    w = w0.clone()
    out = []
    for _ in range(steps):
        loss, w = fn(x, t, w, y)
        (gx,) = torch.autograd.grad(loss, x)
        out.append((loss.detach(), gx, w.clone()))
        with torch.no_grad():
            x -= lr * gx
    return out


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("margin", ["arcface", "cosface"])
@pytest.mark.parametrize("shape", [(1, 500, 1017), (37, 500, 1017), (64, 64, 40)], ids=lambda s: "x".join(map(str, s)))
def test_fused_equals_the_reference_over_steps(backend, dtype, margin, shape):
    """Loss, student gradient and centers after each of three steps; duplicate classes (64 rows, 40 classes),
    an ignored row, B = 1, D = 500, C = 1017."""
    if backend == "cuda" and dtype == torch.float64:
        pytest.skip("the CUDA kernels have no fp64")
    x, t, w, y = inputs(*shape, dtype=dtype, device=device_for(backend))

    def fused(xx, tt, ww, yy):
        return mdkernels.adadistill_loss(xx, tt, ww, yy, margin=margin, backend=backend), ww

    ref = _steps(lambda xx, tt, ww, yy: R.adadistill_loss(xx, tt, ww, yy, margin=margin), x, t, w, y)
    with _cuda_ext.emulated() if backend == "cuda" else torch.enable_grad():  # the backward too
        out = _steps(fused, x, t, w, y)
    tol = torch.float64 if dtype == torch.float64 else torch.float32
    for step, (a, b) in enumerate(zip(out, ref, strict=True)):
        for name, u, v in zip(("loss", "d_student", "centers"), a, b, strict=True):
            assert_close(u, v, tol, f"step {step} {name}")


def test_gradcheck_and_no_gradient_to_teacher_or_centers():
    x, t, w, y = inputs(7, 12, 9)
    mdkernels.adadistill_loss(x.detach(), t, w, y, backend="torch")  # move the centers once
    fn = lambda xx: mdkernels.adadistill_loss(xx, t, w, y, update=False, backend="torch")
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)
    tt = t.clone().requires_grad_()
    loss = mdkernels.adadistill_loss(x, tt, w, y, backend="torch")
    loss.backward()
    assert tt.grad is None and not w.requires_grad


def test_update_reads_the_centers_before_the_batch_and_is_sync_free_sorting():
    """Many rows of few classes, in shuffled order: the fused update's sorted cumulative sums equal the
    reference's row-by-row loop."""
    x, t, w, _ = inputs(200, 24, 6, ignore=False)
    y = torch.randint(0, 6, (200,), generator=torch.Generator().manual_seed(3))
    y[::7] = -1
    want, alpha_ref = R.adadistill_update(w, x.detach(), t, y)
    from mdkernels.ops._common.centers import adadistill_update_

    got = w.clone()
    alpha = adadistill_update_(got, x.detach(), t, y, y != -1)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(alpha, alpha_ref, rtol=1e-12, atol=0)
    untouched = w.clone()
    adadistill_update_(untouched, x.detach(), t, y, torch.zeros_like(y, dtype=torch.bool))  # no valid row
    assert torch.equal(untouched, w)


def test_module():
    torch.manual_seed(0)
    head = mdkernels.nn.AdaDistill(16, 11, backend="torch")
    assert "weight" in head.state_dict() and not list(head.parameters())
    assert abs(head.weight.std().item() - 0.01) < 0.003 and head.weight.shape == (11, 16)
    x, t, _, y = inputs(9, 16, 11, dtype=torch.float32)
    before = head.weight.clone()
    head.eval()  # the official script runs its head in eval mode, and it updates
    loss = head(x, t, y)
    loss.backward()
    assert not torch.equal(head.weight, before) and x.grad is not None and head.last_alpha.shape == (9,)
    frozen = mdkernels.nn.AdaDistill(16, 11, margin="cosface", update=False, backend="torch")
    w0 = frozen.weight.clone()
    frozen(x, t, y)
    assert torch.equal(frozen.weight, w0) and frozen.m == 0.35
    assert "margin='cosface'" in repr(frozen)


@pytest.mark.parametrize(
    "call, match",
    [(lambda x, t, w, y: mdkernels.adadistill_loss(x, t, w, y, margin="sphereface"), "margin must be 'arcface' or"),
     (lambda x, t, w, y: mdkernels.adadistill_loss(x, t[:, :5], w, y), "teacher_embeddings must have 12 columns"),
     (lambda x, t, w, y: mdkernels.adadistill_loss(x, t[:3], w, y), "teacher_embeddings must have 7 rows"),
     (lambda x, t, w, y: mdkernels.adadistill_loss(x, t, w[:, :5], y), "centers must have 12 columns"),
     (lambda x, t, w, y: mdkernels.adadistill_loss(x, t, w.requires_grad_(), y), "centers must not require grad"),
     (lambda x, t, w, y: mdkernels.adadistill_loss(x, t, w, y + 100), r"labels must be in \[0, 9\)"),
     (lambda x, t, w, y: mdkernels.adadistill_loss(x, t, w, y, m=2.0), r"m \(the margin\) must be in"),
     (lambda x, t, w, y: mdkernels.nn.AdaDistill(12, 9, margin="magface"), "margin must be 'arcface' or"),
     (lambda x, t, w, y: mdkernels.nn.AdaDistill(0, 9), "must be positive")],
)  # fmt: skip
def test_bad_input(call, match):
    x, t, w, y = inputs(7, 12, 9)
    with pytest.raises(ValueError, match=match):
        call(x, t, w, y)


# ---- several ranks --------------------------------------------------------------------------------------------
def _rank(rank, world, init, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        from mdkernels.distributed import ShardedAdaDistill

        x, t, w, y = inputs(4 * world, 20, 13, seed=5)
        rows = slice(rank * 4, (rank + 1) * 4)
        torch.manual_seed(0)
        head = mdkernels.nn.AdaDistill(20, 13, backend="torch").double()
        head.weight.copy_(w)
        sharded = ShardedAdaDistill(20, 13, backend="torch").double()
        sharded.load_full_weight(w)
        losses = []
        for _ in range(2):
            losses.append((head(x[rows], t[rows], y[rows]).detach(), sharded(x[rows], t[rows], y[rows]).detach()))
        torch.save({"replicated": head.weight, "sharded": sharded.full_weight(), "losses": losses},
                   os.path.join(out_dir, f"rank{rank}.pt"))  # fmt: skip
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_every_rank_applies_the_global_batch():
    """Two gloo ranks: the replicated module's copies stay identical and equal one process's centers after the
    same two global batches (in rank order); the sharded head's shards, gathered, equal them too, and its loss
    is the global batch's."""
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(world, os.path.join(tmp, "init"), tmp), nprocs=world, join=True)
        got = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(world)]
    x, t, w, y = inputs(4 * world, 20, 13, seed=5)
    want = w.clone()
    for _ in range(2):
        want, _ = R.adadistill_update(want, x.detach(), t, y)
    global_loss = R.adadistill_loss(x, t, w, y)[0]
    for r in got:
        torch.testing.assert_close(r["replicated"], want, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(r["sharded"], want, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(r["losses"][0][1], global_loss, rtol=1e-10, atol=1e-12)
    assert math.isfinite(float(got[0]["losses"][1][0]))
