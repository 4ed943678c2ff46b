"""A whole training step of every head and loss captured into a CUDA graph after eager steps, on a GPU: forward,
backward and the optimizer's update, single and sharded; the replay gives the eager step's numbers, and the eager
steps before it (whose deferred value checks are still pending) do not break the capture.

The logic that makes this possible runs on the CPU too (test_sync_free.py: no host sync in a step, no event
polled or waited on during capture, the flag's stream); these tests need CUDA itself (``-m gpu``).
"""

from __future__ import annotations

import copy
import datetime

import pytest
import torch

import mdkernels
from mdkernels import nn as mnn

pytestmark = [pytest.mark.gpu, pytest.mark.needs_cuda]  # graph capture and replay: CUDA itself

B, D, C = 64, 128, 4099


def _data():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, D, device="cuda", generator=g)
    y = torch.randint(0, C, (B,), device="cuda", generator=g)
    t = torch.randn(B, D, device="cuda", generator=g)
    return x, y, t


HEADS = {
    "ArcFace": lambda b: mnn.ArcFace(D, C, backend=b),
    "CosFace": lambda b: mnn.CosFace(D, C, backend=b),
    "SphereFace": lambda b: mnn.SphereFace(D, C, backend=b),
    "ArcFaceLoss": lambda b: mnn.ArcFaceLoss(C, D, backend=b),
    "PartialFCHead": lambda b: mnn.PartialFCHead(D, C, interclass_filtering_threshold=0.2, backend=b),
    "AdaFace": lambda b: mnn.AdaFace(D, C, backend=b),
    "CurricularFace": lambda b: mnn.CurricularFace(D, C, backend=b),
    "MagFace": lambda b: mnn.MagFace(D, C, backend=b),
    "ElasticArcFace": lambda b: mnn.ElasticArcFace(D, C, std=0.0, backend=b),  # std 0: the replay's numbers
    "ElasticCosFace": lambda b: mnn.ElasticCosFace(D, C, std=0.0, backend=b),
    "SubCenterArcFace": lambda b: mnn.SubCenterArcFace(D, C, K=3, backend=b),
}
LOSSES = {
    "MarginDistillation": lambda b, w: (lambda x, y, t: mnn.MarginDistillation(w, backend=b)(x, y,
                                                                                             teacher_embeddings=t)),
    "ProxylessKD": lambda b, w: (lambda x, y, t: mnn.ProxylessKD(w, backend=b)(x, y)),
    "MarginKD": lambda b, w: (lambda x, y, t: mnn.MarginKD(w, backend=b)(x, t, y)),
    "AngularDistillation": lambda b, w: (lambda x, y, t: mdkernels.angular_distillation_loss(x, t, backend=b)),
    "triplet explicit": lambda b, w: (lambda x, y, t: mdkernels.triplet_distillation_loss(
        x, t, torch.arange(30, device="cuda").view(10, 3), backend=b)),
}  # fmt: skip


def _backends():
    from mdkernels import _cuda_ext

    return ["triton"] + (["cuda"] if torch.cuda.is_available() and _cuda_ext.usable(torch.empty(1, device="cuda"))
                         else [])  # fmt: skip


def _sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def _capture_and_compare(make_model, loss_of, x, y, t, make_opt=_sgd, fuse=False):
    """Eager steps, then one step captured; the replay against an eager step from the same state (a twin built by
    ``make_model`` and loaded with the model's and the optimizer's state just before the replay). ``fuse``: the
    captured model's centers take their update in the backward (mdkernels.fuse_center_update); the twin's do not."""
    model = make_model()
    opt = make_opt([p for p in model.parameters() if p.requires_grad])
    if fuse:
        mdkernels.fuse_center_update(model, opt)

    def step():
        opt.zero_grad(set_to_none=False)
        loss = loss_of(model, x, y, t)
        loss.backward()
        opt.step()
        return loss

    for _ in range(3):  # eager steps first: their deferred checks are pending when the capture starts
        step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the warm-up the capture needs (allocator pools, lazy init)
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    twin = make_model()
    twin.load_state_dict(model.state_dict())
    twin_opt_state = copy.deepcopy(opt.state_dict())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    graph.replay()  # the captured step runs once
    twin_opt = make_opt([p for p in twin.parameters() if p.requires_grad])
    twin_opt.load_state_dict(twin_opt_state)
    twin_opt.zero_grad(set_to_none=False)
    eager_loss = loss_of(twin, x, y, t)
    eager_loss.backward()
    twin_opt.step()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_loss, eager_loss.detach(), rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("name", list(HEADS))
def test_a_head_training_step_replays_as_it_ran(name, backend):
    if backend == "cuda" and name in ("CurricularFace", "SubCenterArcFace"):
        pytest.skip("the CUDA C++ kernels have neither CurricularFace's modulation nor the sub-center max")
    def make():
        torch.manual_seed(0)
        return torch.nn.ModuleDict({"net": torch.nn.Linear(D, D), "head": HEADS[name](backend)}).cuda().train()

    x, y, t = _data()
    _capture_and_compare(make, lambda m, x, y, t: m["head"](m["net"](x), y), x, y, t)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("name", list(LOSSES))
def test_a_distillation_step_replays_as_it_ran(name, backend):
    if backend == "cuda" and name in ("MarginKD", "triplet explicit"):
        pytest.skip("no CUDA C++ kernel for margin KD or triplet distillation")
    w = torch.nn.functional.normalize(torch.randn(C, D, device="cuda"), dim=1)
    loss = LOSSES[name](backend, w)

    def make():
        torch.manual_seed(0)
        return torch.nn.ModuleDict({"net": torch.nn.Linear(D, D)}).cuda()

    x, y, t = _data()
    _capture_and_compare(make, lambda m, x, y, t: loss(m["net"](x), y, t), x, y, t)


def test_a_sharded_head_step_replays_as_it_ran(tmp_path):
    """The sharded head on one rank (NCCL): its host handshake runs in Python at capture, its collectives and
    kernels replay; sampling off (the sample's draw would be the graph's own)."""
    import torch.distributed as dist

    from mdkernels import distributed as mdist

    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    try:
        def make():
            torch.manual_seed(0)
            return torch.nn.ModuleDict({"net": torch.nn.Linear(D, D), "head": mdist.ShardedMarginHead(D, C)}).cuda()

        x, y, t = _data()
        _capture_and_compare(make, lambda m, x, y, t: m["head"](m["net"](x), y), x, y, t)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", _backends())
def test_an_adadistill_step_replays_as_it_ran(backend):
    """AdaDistill's centers move in place in every step (a buffer): captured with the step, replayed."""

    def make():
        torch.manual_seed(0)
        return torch.nn.ModuleDict({"net": torch.nn.Linear(D, D), "head": mnn.AdaDistill(D, C, backend=backend)}).cuda()

    x, y, t = _data()
    _capture_and_compare(make, lambda m, x, y, t: m["head"](m["net"](x), t, y), x, y, t)


@pytest.mark.parametrize("opt_name", ["sgd", "adamw_capturable"])
def test_a_fused_center_update_step_replays_as_it_ran(opt_name):
    """The centers' update inside the backward (mdkernels.fuse_center_update), captured with the rest of the step
    after eager steps: the replay equals an unfused eager step from the same state. AdamW under capture keeps its
    step count on the device (capturable=True), as torch.optim requires for its own update."""
    make_opt = {"sgd": _sgd, "adamw_capturable": lambda p: torch.optim.AdamW(p, lr=1e-3, capturable=True)}[opt_name]

    def make():
        torch.manual_seed(0)
        return torch.nn.ModuleDict({"net": torch.nn.Linear(D, D), "head": mnn.ArcFace(D, C)}).cuda().train()

    x, y, t = _data()
    _capture_and_compare(make, lambda m, x, y, t: m["head"](m["net"](x), y), x, y, t, make_opt=make_opt, fuse=True)
