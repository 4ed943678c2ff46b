"""CUDA C++ backend of the fused margin CE (csrc/margin_ce.cu, csrc/margin_target.cu): same contract as
the Triton launchers."""

from __future__ import annotations

import torch

from mdkernels import _cuda_ext
from mdkernels._cuda_ext import guard_device
from mdkernels.ops._common.env import num_sms
from mdkernels.ops._common.epilogue import grad_scale, merge_splits
from mdkernels.ops._common.margin import NonTarget


@guard_device
def forward(x, w, labels, rx, rw, s, nt: NonTarget, need_o):
    """``(lse_nt, o)`` as :func:`mdkernels.ops.margin_ce.torch_backend.forward` (``margin_ce_forward``)."""
    ext = _cuda_ext.ext
    B, D = x.shape
    C = w.shape[0]
    bn = ext.margin_tile_classes
    row_tiles, class_tiles = -(-B // 64), -(-C // bn)
    splits = max(1, min(class_tiles, (4 * num_sms(x.device)) // max(row_tiles, 1)))
    per_split = -(-class_tiles // splits) * bn
    splits = -(-C // per_split)
    m = torch.empty(splits, B, dtype=torch.float32, device=x.device)
    l = torch.empty_like(m)
    o = torch.empty(splits, B, D, dtype=torch.float32, device=x.device) if need_o else None
    ext.margin_ce_forward(
        _cuda_ext.dtype_code(x), x.data_ptr(), w.data_ptr(), rx.data_ptr(), rw.data_ptr(), labels.data_ptr(),
        m.data_ptr(), l.data_ptr(), o.data_ptr() if need_o else 0, B, C, D, x.stride(0), w.stride(0), splits,
        per_split, float(s), float(nt.tau if nt.tau is not None else 0.0), nt.tau is not None, float(nt.cos_clamp),
        _cuda_ext.stream_of(x),
    )  # fmt: skip
    return merge_splits(m, l, o if need_o else None, s)


@guard_device
def center_grad(x, w, labels, rx, rw, lse, gr, coef, raw_t, s, nt: NonTarget):
    """``dL/dW`` (C, D) in the centers' dtype (``margin_ce_center_grad``), written once."""
    B, D = x.shape
    C = w.shape[0]
    dw = torch.empty_like(w)
    if B == 0 or C == 0:
        return dw.zero_()
    # every tensor whose pointer goes to the kernel is bound to a name: a temporary would be freed first
    lse, gr, coef = lse.contiguous(), gr.contiguous(), coef.contiguous()
    gscale = grad_scale(gr, coef, s)
    _cuda_ext.ext.margin_ce_center_grad(
        _cuda_ext.dtype_code(x), x.data_ptr(), w.data_ptr(), rx.data_ptr(), rw.data_ptr(), labels.data_ptr(),
        lse.data_ptr(), gr.data_ptr(), coef.data_ptr(), gscale.data_ptr(), dw.data_ptr(), B, C, D, x.stride(0),
        w.stride(0), dw.stride(0), float(s), float(nt.tau if nt.tau is not None else 0.0), nt.tau is not None,
        float(nt.cos_clamp), _cuda_ext.stream_of(x),
    )  # fmt: skip
    return dw


@guard_device
def target_terms(x, w, labels_k, rx, rw, m2, s, m1, m3, fallback, grad):
    """The CUDA row kernel (csrc/margin_target.cu): ``(raw_t, z_t, slope)`` in one launch, one warp per
    row (rows with ``labels_k < 0``: zeros). Same values as :func:`_target_cos` plus
    :func:`margin_target_and_slope` in fp32."""
    B, D = x.shape
    raw, z, slope = (torch.empty(B, dtype=torch.float32, device=x.device) for _ in range(3))
    m2 = m2.to(torch.float32).expand(B).contiguous()
    _cuda_ext.ext.margin_target_forward(
        _cuda_ext.dtype_code(x),
        x.data_ptr(),
        w.data_ptr(),
        labels_k.data_ptr(),
        rx.data_ptr(),
        rw.data_ptr(),
        m2.data_ptr(),
        raw.data_ptr(),
        z.data_ptr(),
        slope.data_ptr(),
        B,
        D,
        x.stride(0),
        w.stride(0),
        float(s),
        float(m1),
        float(m3),
        bool(fallback),
        grad == "straight_through",
        _cuda_ext.stream_of(x),
    )
    return raw, z, slope


