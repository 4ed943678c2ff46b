"""Sharded centers over gloo process groups (2 and 3 CPU ranks) against the unsharded op."""

from __future__ import annotations

import datetime
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import mdkernels
from mdkernels import distributed as mdist
from mdkernels import reference as R

pytestmark = pytest.mark.slow  # gloo ranks in spawned processes: not in the quick tier (docs/testing.md)

C, D, B_LOCAL = 1001, 64, 5  # C divisible by neither 2 nor 3

CASES = {
    "arcface_fp64": dict(dtype=torch.float64, kw=dict(m2=0.5)),
    "filter_cosface_fp64": dict(dtype=torch.float64, kw=dict(s=16.0, m1=1.0, m2=0.0, m3=0.35, interclass_filter=0.1)),
    "arcface_fp32": dict(dtype=torch.float32, kw=dict(m2=0.5)),
    "first_shard_only_fp64": dict(dtype=torch.float64, kw=dict(m2=0.5), max_label=150),  # other ranks: none
    "straight_through_triton_fp64": dict(
        dtype=torch.float64, kw=dict(m2=0.4, grad="straight_through"), backend="triton"
    ),  # fmt: skip
}


def global_inputs(world, dtype, max_label=C, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(world * B_LOCAL, D, generator=g, dtype=torch.float64)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, max_label, (world * B_LOCAL,), generator=g)
    y[1] = -1
    x = x + 1.5 * w[y.clamp_min(0)]
    return x.to(dtype), w.to(dtype), y


def row_weights(world):
    return torch.linspace(0.5, 2.0, world * B_LOCAL, dtype=torch.float64)


def teacher_embeddings(x, w, y):
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    return R.normalize(w[y.clamp_min(0)]) + 0.5 * R.normalize(noise)


def _init(rank, world, init_file, timeout=30):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))  # fmt: skip


def _worker(rank, world, init_file, out_dir, mode):
    results = {}
    try:
        _init(rank, world, init_file, timeout=10 if mode != "cases" else 60)
        if mode == "cases":
            results = _run_cases(rank, world)
        elif mode == "bad_label":
            x, w, y = global_inputs(world, torch.float64)
            start, n = mdist.shard_range(C, rank, world)
            y_local = y[rank * B_LOCAL : (rank + 1) * B_LOCAL].clone()
            if rank == 1:
                y_local[0] = C + 5
            t0 = time.time()
            try:
                mdist.sharded_margin_cross_entropy(x[rank * B_LOCAL : (rank + 1) * B_LOCAL], w[start : start + n],
                                                   y_local, class_start=start, num_classes=C)  # fmt: skip
                results["error"] = None
            except ValueError as err:
                results["error"] = str(err)
            results["seconds"] = time.time() - t0
            try:  # a backend that cannot run these tensors: an error on every rank, never a kernel launch
                mdist.sharded_margin_cross_entropy(x[rank * B_LOCAL : (rank + 1) * B_LOCAL], w[start : start + n],
                                                   y[rank * B_LOCAL : (rank + 1) * B_LOCAL], class_start=start,
                                                   num_classes=C, backend="cuda")  # fmt: skip
                results["cuda_error"] = None
            except ValueError as err:
                results["cuda_error"] = str(err)
            try:  # an argument only rank 1 gets wrong: the others stop too, before any heavy collective
                mdist.sharded_margin_cross_entropy(x[rank * B_LOCAL : (rank + 1) * B_LOCAL], w[start : start + n],
                                                   y[rank * B_LOCAL : (rank + 1) * B_LOCAL], class_start=start,
                                                   num_classes=C, sample_rate=2.0 if rank == 1 else 1.0)  # fmt: skip
                results["meta_error"] = None
            except ValueError as err:
                results["meta_error"] = str(err)
        elif mode == "crash":
            if rank == 1:
                os._exit(3)
            x, w, y = global_inputs(world, torch.float64)
            start, n = mdist.shard_range(C, rank, world)
            t0 = time.time()
            try:
                mdist.sharded_margin_cross_entropy(x[:B_LOCAL], w[start : start + n], y[:B_LOCAL],
                                                   class_start=start, num_classes=C)  # fmt: skip
                results["error"] = None
            except Exception as err:  # gloo reports the lost peer or the timeout
                results["error"] = f"{type(err).__name__}: {err}"
            results["seconds"] = time.time() - t0
    except Exception:
        results["crash"] = traceback.format_exc()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    if mode == "crash":  # the group is broken: leave without running its destructors
        os._exit(0)
    if dist.is_initialized():
        dist.destroy_process_group()


def _run_cases(rank, world):
    out = {}
    sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
    for name, case in CASES.items():
        x, w, y = global_inputs(world, case["dtype"], case.get("max_label", C))
        start, n = mdist.shard_range(C, rank, world)
        xl = x[sl].clone().requires_grad_()
        wl = w[start : start + n].clone().requires_grad_()
        loss = mdist.sharded_margin_cross_entropy(xl, wl, y[sl], class_start=start, num_classes=C,
                                                  backend=case.get("backend", "torch"), **case["kw"])  # fmt: skip
        loss.backward()
        out[name] = (loss.detach(), xl.grad, wl.grad, start, n)
    # reduction="none": each rank back-propagates its own rows with its own weights
    x, w, y = global_inputs(world, torch.float64)
    start, n = mdist.shard_range(C, rank, world)
    xl = x[sl].clone().requires_grad_()
    wl = w[start : start + n].clone().requires_grad_()
    rows = mdist.sharded_margin_cross_entropy(xl, wl, y[sl], class_start=start, num_classes=C, reduction="none")
    (rows * row_weights(world)[sl]).sum().backward()
    out["none"] = (rows.detach(), xl.grad, wl.grad, start, n)
    # sampling: reproducible, and equal to the unsharded loss over the kept classes
    x, w, y = global_inputs(world, torch.float64)
    start, n = mdist.shard_range(C, rank, world)
    losses = []
    for _ in range(2):
        g = torch.Generator().manual_seed(1234 + rank)
        loss = mdist.sharded_margin_cross_entropy(
            x[sl], w[start : start + n], y[sl], class_start=start, num_classes=C, sample_rate=0.3, generator=g
        )
        losses.append(loss.item())
    local = torch.where((y >= start) & (y < start + n), y - start, torch.full_like(y, -1))
    keep = mdist.sample_size(n, 0.3, len(y))  # every positive kept without counting them
    kept = mdist._sample_classes(local, n, keep, torch.Generator().manual_seed(1234 + rank)) + start
    xl, wl = x[sl].clone().requires_grad_(), w[start : start + n].clone().requires_grad_()
    mdist.sharded_margin_cross_entropy(xl, wl, y[sl], class_start=start, num_classes=C, sample_rate=0.3,
                                       generator=torch.Generator().manual_seed(1234 + rank)).backward()  # fmt: skip
    out["sampling"] = (losses, kept, xl.grad, wl.grad, start, n)
    # MarginDistillation and ProxylessKD with frozen sharded teacher centers
    t = teacher_embeddings(x, w, y)
    xl = x[sl].clone().requires_grad_()
    md = mdist.sharded_margin_distillation_loss(xl, w[start : start + n], y[sl], class_start=start, num_classes=C,
                                                teacher_embeddings=t[sl])  # fmt: skip
    md.backward()
    xp = x[sl].clone().requires_grad_()
    pk = mdist.sharded_proxyless_kd_loss(xp, w[start : start + n], y[sl], class_start=start, num_classes=C,
                                         margin="cosface", m=0.35)  # fmt: skip
    pk.backward()
    out["distill"] = (md.detach(), xl.grad, pk.detach(), xp.grad)
    # head: uneven split, checkpoint round trip, and one DDP step against a single-process step
    sizes = [C - 10 * (world - 1)] + [10] * (world - 1)
    head = mdist.ShardedMarginHead(D, C, sizes=sizes).double()
    head.load_full_weight(w)
    assert torch.equal(head.full_weight(), w)
    torch.manual_seed(0)
    backbone = torch.nn.Linear(16, D).double()
    ddp = torch.nn.parallel.DistributedDataParallel(backbone)
    inp = torch.randn(world * B_LOCAL, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    opt = torch.optim.SGD([*ddp.parameters(), *head.parameters()], lr=0.5)
    loss = head(ddp(inp[sl]), y[sl])
    loss.backward()
    opt.step()
    out["ddp"] = (loss.detach(), backbone.weight.detach().clone(), head.full_weight())
    out["fused"] = _fused_center_update_runs(rank, world, sl)
    return out


FUSED_OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.05),
}


def _fused_center_update_runs(rank, world, sl, steps=3):
    """Each rank's shard, ``steps`` steps with the fused center update and with optimizer.step(), with and without
    negative-class sampling: ``{(optimizer, sample_rate): [(shard, state, full weight) unfused, ... fused]}``."""
    x, w, y = global_inputs(world, torch.float64)
    runs = {}
    for name, make in FUSED_OPTIMIZERS.items():
        for rate in (1.0, 0.5):
            pair = []
            for fused in (False, True):
                head = mdist.ShardedMarginHead(D, C, sample_rate=rate).double()
                head.load_full_weight(w)
                opt = make(head.parameters())
                handle = mdkernels.fuse_center_update(head, opt) if fused else None
                g = torch.Generator().manual_seed(99 + rank)
                for k in range(steps):
                    opt.zero_grad(set_to_none=True)
                    head(x[sl] * (1 + 0.1 * k), y[sl], generator=g).backward()
                    opt.step()
                state = {key: v.clone() for key, v in opt.state[head.weight].items()}
                pair.append((head.weight.detach().clone(), state, head.full_weight()))
                if handle is not None:
                    handle.remove()
            runs[(name, rate)] = pair
    return runs


def _spawn(world, mode, tmp_path):
    init_file = tmp_path / f"init_{mode}_{world}"
    mp.spawn(_worker, args=(world, str(init_file), str(tmp_path), mode), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module", params=[2, 3])
def sharded_run(request, tmp_path_factory):
    world = request.param
    results = _spawn(world, "cases", tmp_path_factory.mktemp(f"dist{world}"))
    for r in results:
        assert "crash" not in r, r.get("crash")
    return world, results


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_equals_unsharded(sharded_run, name):
    world, results = sharded_run
    case = CASES[name]
    dtype = case["dtype"]
    x, w, y = global_inputs(world, dtype, case.get("max_label", C))
    x.requires_grad_()
    w.requires_grad_()
    ref = R.margin_cross_entropy(x, w, y, **case["kw"])
    gx, gw = torch.autograd.grad(ref, (x, w))
    tol = 1e-9 if dtype == torch.float64 else 1e-5  # relative to each tensor's largest entry

    def close(a, b):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max().clamp_min(1e-6)))

    for rank, r in enumerate(results):
        loss, dx, dw, start, n = r[name]
        close(loss, ref.detach())  # the same loss on every rank
        close(dx, gx[rank * B_LOCAL : (rank + 1) * B_LOCAL])
        close(dw, gw[start : start + n])


def test_reduction_none_gradients(sharded_run):
    world, results = sharded_run
    x, w, y = global_inputs(world, torch.float64)
    x.requires_grad_()
    w.requires_grad_()
    rows = R.margin_cross_entropy(x, w, y, reduction="none")
    gx, gw = torch.autograd.grad((rows * row_weights(world)).sum(), (x, w))
    gw_sum = torch.zeros_like(gw)
    for rank, r in enumerate(results):
        loss_rows, dx, dw, start, n = r["none"]
        sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        torch.testing.assert_close(loss_rows, rows.detach()[sl], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(dx, gx[sl], rtol=1e-9, atol=1e-12)
        gw_sum[start : start + n] = dw
    torch.testing.assert_close(gw_sum, gw, rtol=1e-9, atol=1e-12)


def test_sampling_is_reproducible_and_exact_on_the_kept_classes(sharded_run):
    """Partial FC's negative sampling: the loss and both gradients equal the unsharded op over the kept classes;
    the kept centers train (their gradient is the reference's), the others get a zero gradient."""
    world, results = sharded_run
    x, w, y = global_inputs(world, torch.float64)
    kept = torch.cat([r["sampling"][1] for r in results])
    assert kept.numel() < C
    valid = y >= 0
    assert torch.isin(y[valid], kept).all()  # every positive class is kept
    remap = torch.full((C,), -1, dtype=torch.long)
    remap[kept] = torch.arange(kept.numel())
    xr, wk = x.clone().requires_grad_(), w[kept].clone().requires_grad_()
    ref = R.margin_cross_entropy(xr, wk, torch.where(valid, remap[y.clamp_min(0)], y))
    gx, gk = torch.autograd.grad(ref, (xr, wk))
    gw = torch.zeros_like(w)
    gw[kept] = gk
    for rank, r in enumerate(results):
        (a, b), _, dx, dw, start, n = r["sampling"]
        assert a == b  # the same seed gives the same sample
        assert a == pytest.approx(ref.item(), rel=1e-10)
        sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        torch.testing.assert_close(dx, gx[sl], rtol=1e-9, atol=1e-12)
        assert dw is not None, "the sampled centers got no gradient"
        torch.testing.assert_close(dw, gw[start : start + n], rtol=1e-9, atol=1e-12)
        assert dw[(gw[start : start + n] != 0).any(1)].abs().sum() > 0


def test_sharded_distillation(sharded_run):
    world, results = sharded_run
    x, w, y = global_inputs(world, torch.float64)
    t = teacher_embeddings(x, w, y)
    xm, xp = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref_md = R.margin_distillation_loss(xm, w, y, teacher_embeddings=t)  # Dmax over the global batch
    ref_pk = R.proxyless_kd_loss(xp, w, y, margin="cosface", m=0.35)
    g_md, g_pk = torch.autograd.grad(ref_md, xm)[0], torch.autograd.grad(ref_pk, xp)[0]
    for rank, r in enumerate(results):
        md, gmd, pk, gpk = r["distill"]
        sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        torch.testing.assert_close(md, ref_md.detach(), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(gmd, g_md[sl], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(pk, ref_pk.detach(), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(gpk, g_pk[sl], rtol=1e-9, atol=1e-12)


def test_ddp_step_equals_single_process_step(sharded_run):
    world, results = sharded_run
    x, w, y = global_inputs(world, torch.float64)
    torch.manual_seed(0)
    backbone = torch.nn.Linear(16, D).double()
    head = mdkernels.nn.ArcFace(D, C).double()
    with torch.no_grad():
        head.weight.copy_(w)
    inp = torch.randn(world * B_LOCAL, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    opt = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.5)
    loss = head(backbone(inp), y)
    loss.backward()
    opt.step()
    for r in results:
        l_sharded, bb_weight, full_w = r["ddp"]
        torch.testing.assert_close(l_sharded, loss.detach(), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(bb_weight, backbone.weight.detach(), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(full_w, head.weight.detach(), rtol=1e-9, atol=1e-12)


def test_bad_arguments_on_one_rank_fail_every_rank(tmp_path):
    results = _spawn(2, "bad_label", tmp_path)
    assert "crash" not in results[0] and "crash" not in results[1]
    for r in results:  # labels are checked on the gathered batch: every rank names rank 1's bad label
        assert "labels must be in [0, 1001) or equal ignore_index=-1; found 1006" in r["error"]
        assert "backend='cuda' needs CUDA" in r["cuda_error"]
    assert "rank 1: sample_rate must be in (0, 1]" in results[1]["meta_error"]
    assert "rank(s) [1] rejected their arguments" in results[0]["meta_error"]


def test_a_dead_rank_does_not_hang_the_others(tmp_path):
    init_file = tmp_path / "init_crash"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(r, 2, str(init_file), str(tmp_path), "crash")) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)  # a guard against a hang, not a speed check: gloo's own timeout is 10 s
    assert all(not p.is_alive() for p in procs), "a rank hung"
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    assert r0.get("error") or r0.get("crash"), r0


def test_shard_range_and_not_initialised():
    assert [mdist.shard_range(10, r, 3) for r in range(3)] == [(0, 4), (4, 3), (7, 3)]
    assert mdist.shard_range(10, 1, 2, sizes=[7, 3]) == (7, 3)
    with pytest.raises(ValueError, match="summing to 10"):
        mdist.shard_range(10, 0, 2, sizes=[5, 4])
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="init_process_group"):
            mdist.sharded_margin_cross_entropy(torch.randn(2, 4), torch.randn(3, 4), torch.tensor([0, 1]),
                                               class_start=0, num_classes=3)  # fmt: skip


def test_fused_center_update_sharded(sharded_run):
    """Every rank updates its own shard in its backward: the same as optimizer.step() on each rank (the unsampled
    rows too: their momentum decays and their weight decay applies), and without sampling the same as one process
    running the unsharded head fused."""
    world, results = sharded_run
    x, w, y = global_inputs(world, torch.float64)

    def close(a, b):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12 * max(1.0, float(b.abs().max())))

    for (name, rate), _ in results[0]["fused"].items():
        for r in results:
            (wa, sa, _), (wb, sb, _) = r["fused"][(name, rate)]
            close(wb, wa)
            assert sorted(sa) == sorted(sb)
            for key in sa:
                close(sb[key], sa[key])
        if rate == 1.0:  # one process, the whole head, fused
            head = mdkernels.nn.ArcFace(D, C, backend="torch").double()
            with torch.no_grad():
                head.weight.copy_(w)
            opt = FUSED_OPTIMIZERS[name](head.parameters())
            mdkernels.fuse_center_update(head, opt)
            for k in range(3):
                opt.zero_grad(set_to_none=True)
                head(x * (1 + 0.1 * k), y).backward()
                opt.step()
            torch.testing.assert_close(results[0]["fused"][(name, rate)][1][2], head.weight.detach(), rtol=0,
                                       atol=1e-10)  # fmt: skip
