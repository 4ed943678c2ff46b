"""Drop-in heads: insightface-layout modules, pytorch-metric-learning adapters, PartialFC head."""

from __future__ import annotations

import math

import pytest
import torch

import mdkernels
from mdkernels import nn as mnn
from mdkernels import reference as R


def _data(B=12, D=32, C=57, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, D, generator=g, dtype=torch.float64), torch.randint(0, C, (B,), generator=g)


@pytest.mark.parametrize(
    "cls,kw,margins",
    [
        (mnn.ArcFace, {}, dict(m1=1.0, m2=0.5, m3=0.0)),
        (mnn.CosFace, {}, dict(m1=1.0, m2=0.0, m3=0.35)),
        (mnn.SphereFace, {}, dict(m1=1.35, m2=0.0, m3=0.0)),
        (mnn.CombinedMargin, dict(m1=1.0, m2=0.3, m3=0.2), dict(m1=1.0, m2=0.3, m3=0.2)),
    ],
)
def test_heads_equal_the_reference(cls, kw, margins):
    x, y = _data()
    x = x.detach().requires_grad_()
    head = cls(32, 57, backend="torch", **kw).double()
    assert head.weight.shape == (57, 32)
    loss = head(x, y)
    ref = R.margin_cross_entropy(x, head.weight, y, s=64.0, **margins)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-10)
    gx, gw = torch.autograd.grad(loss, (x, head.weight))
    rx, rw = torch.autograd.grad(ref, (x, head.weight))
    torch.testing.assert_close(gx, rx, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gw, rw, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_pytorch_metric_learning_adapters_match_pml(kind):
    pml = pytest.importorskip("pytorch_metric_learning.losses")
    torch.manual_seed(0)
    x, y = _data(B=16, D=24, C=40)
    x = x.float().requires_grad_()
    if kind == "arcface":
        theirs, ours = pml.ArcFaceLoss(40, 24, margin=28.6, scale=64), mnn.ArcFaceLoss(40, 24, margin=28.6, scale=64)
    else:
        theirs, ours = pml.CosFaceLoss(40, 24, margin=0.35, scale=64), mnn.CosFaceLoss(40, 24, margin=0.35, scale=64)
    ours.load_state_dict(theirs.state_dict())  # same parameter name and (D, C) layout
    a, b = theirs(x, y), ours(x, y)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)
    ga = torch.autograd.grad(a, (x, theirs.W))
    gb = torch.autograd.grad(b, (x, ours.W))
    for u, v in zip(ga, gb, strict=True):
        torch.testing.assert_close(u, v, rtol=2e-4, atol=2e-6)


def _insightface_combined_margin(cos, labels, s, m1, m2, m3):
    """arcface_torch's CombinedMarginLoss.forward, transcribed: the margin under no_grad (ArcFace)."""
    logits = cos.clone()
    idx = torch.where(labels != -1)[0]
    target = logits[idx, labels[idx]]
    if m1 == 1.0 and m3 == 0.0:
        with torch.no_grad():
            target.arccos_()
            logits.arccos_()
            logits[idx, labels[idx]] = target + m2
            logits.cos_()
        return logits * s
    logits[idx, labels[idx]] = target - m3
    return logits * s


@pytest.mark.parametrize("margins", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.4)])
def test_partial_fc_head_matches_insightface_numerics(margins):
    x, y = _data(B=10, D=16, C=33)
    y[4] = -1
    x.requires_grad_()
    head = mnn.PartialFCHead(16, 33, 64.0, *margins, backend="torch").double()
    loss = head(x, y)
    cos = torch.nn.functional.linear(torch.nn.functional.normalize(x), torch.nn.functional.normalize(head.weight))
    logits = _insightface_combined_margin(cos, y, 64.0, *margins)
    valid = y != -1
    theirs = torch.nn.functional.cross_entropy(logits[valid], y[valid])
    assert loss.item() == pytest.approx(theirs.item(), rel=1e-10)
    for u, v in zip(
        torch.autograd.grad(loss, (x, head.weight)), torch.autograd.grad(theirs, (x, head.weight)), strict=True
    ):
        torch.testing.assert_close(u, v, rtol=1e-8, atol=1e-12)


def test_partial_fc_head_rejects_what_insightface_rejects():
    with pytest.raises(ValueError, match="CombinedMargin"):
        mnn.PartialFCHead(8, 10, 64.0, 1.0, 0.3, 0.2)
    with pytest.raises(ValueError, match="sample_rate"):
        mnn.PartialFCHead(8, 10, sample_rate=0.1)


def test_head_trains_and_bad_sizes():
    with pytest.raises(ValueError, match="positive"):
        mnn.ArcFace(0, 10)
    torch.manual_seed(0)
    head = mnn.ArcFace(8, 5, s=16.0, m=0.2)
    x = torch.nn.functional.normalize(torch.randn(5, 8), dim=1).repeat(4, 1)
    y = torch.arange(5).repeat(4)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    first = head(x, y).item()
    for _ in range(30):
        opt.zero_grad()
        head(x, y).backward()
        opt.step()
    assert head(x, y).item() < 0.5 * first
    assert math.isfinite(first)
    assert "num_classes=5" in repr(head)
    assert mdkernels.nn.ArcFace is mnn.ArcFace
