"""CUDA C++ backend of the fused margin CE (csrc/margin_ce.cu, csrc/margin_target.cu): same contract as
the Triton launchers."""

from __future__ import annotations

import torch

from mdkernels import _cuda_ext
from mdkernels._cuda_ext import guard_device
from mdkernels.ops._common.env import num_sms
from mdkernels.ops._common.epilogue import grad_scale


@guard_device
def lse_nontarget(x, w, labels, rx, rw, s, tau) -> torch.Tensor:
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
    ext.margin_lse_forward(
        _cuda_ext.dtype_code(x),
        x.data_ptr(),
        w.data_ptr(),
        rx.data_ptr(),
        rw.data_ptr(),
        labels.data_ptr(),
        m.data_ptr(),
        l.data_ptr(),
        B,
        C,
        D,
        x.stride(0),
        w.stride(0),
        splits,
        per_split,
        float(s),
        float(tau if tau is not None else 0.0),
        tau is not None,
        _cuda_ext.stream_of(x),
    )
    m_max = m.max(0).values
    return m_max + torch.log((l * torch.exp(m - m_max)).sum(0))


@guard_device
def grad_hat(x, w, labels, rx, rw, lse, gr, s, tau, need_dw):
    B, D = x.shape
    C = w.shape[0]
    dxh = torch.zeros(B, D, dtype=torch.float32, device=x.device)
    dwh = torch.zeros(C, D, dtype=torch.float32, device=x.device) if need_dw else None
    gr = gr.contiguous()
    gscale = grad_scale(gr)
    _cuda_ext.ext.margin_ce_backward(
        _cuda_ext.dtype_code(x),
        x.data_ptr(),
        w.data_ptr(),
        rx.data_ptr(),
        rw.data_ptr(),
        labels.data_ptr(),
        lse.contiguous().data_ptr(),
        gr.data_ptr(),
        gscale.data_ptr(),
        dxh.data_ptr(),
        dwh.data_ptr() if need_dw else 0,
        B,
        C,
        D,
        x.stride(0),
        w.stride(0),
        float(s),
        float(tau if tau is not None else 0.0),
        tau is not None,
        _cuda_ext.stream_of(x),
    )
    return dxh, dwh



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


