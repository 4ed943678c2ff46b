"""CUDA C++ backend of the fused margin CE (csrc/margin_ce.cu, csrc/margin_target.cu): same contract as
the Triton launchers. Every call goes through :func:`mdkernels._cuda_ext.call` (the tensors' GPU current,
its current stream). Any strides: the kernels take both strides of x, W and dW."""

from __future__ import annotations

import torch

from mdkernels import _cuda_ext
from mdkernels.ops._common.env import num_sms
from mdkernels.ops._common.epilogue import grad_scale, merge_splits
from mdkernels.ops._common.margin import NonTarget


def _strides(x, w) -> list[int]:
    return [x.stride(0), x.stride(1), w.stride(0), w.stride(1)]


def forward(x, w, labels, rx, rw, s, nt: NonTarget, need_o, op_dtype=None):
    """``(lse_nt, o)`` as :func:`mdkernels.ops.margin_ce.torch_backend.forward` (``margin_ce_forward``)."""
    if op_dtype is not None:
        raise ValueError("the CUDA C++ margin kernels have no autocast path (fp32 inputs, 16-bit operands); "
                         "use backend='triton'")  # fmt: skip
    B, D = x.shape
    C = w.shape[0]
    bn = _cuda_ext.ext.margin_tile_classes
    row_tiles, class_tiles = -(-B // 64), -(-C // bn)
    splits = max(1, min(class_tiles, (4 * num_sms(x.device)) // max(row_tiles, 1)))
    per_split = -(-class_tiles // splits) * bn
    splits = -(-C // per_split)
    m = torch.empty(splits, B, dtype=torch.float32, device=x.device)
    l = torch.empty_like(m)
    o = torch.empty(splits, B, D, dtype=torch.float32, device=x.device) if need_o else None
    _cuda_ext.call(
        "margin_ce_forward", x, _cuda_ext.dtype_code(x), x.data_ptr(), w.data_ptr(), rx.data_ptr(), rw.data_ptr(),
        labels.data_ptr(), m.data_ptr(), l.data_ptr(), o.data_ptr() if need_o else 0, B, C, D, _strides(x, w), splits,
        per_split, float(s), float(nt.tau if nt.tau is not None else 0.0), nt.tau is not None, float(nt.cos_clamp),
    )  # fmt: skip
    return merge_splits(m, l, o if need_o else None, s)


def center_grad(x, w, labels, rx, rw, lse, gr, coef, raw_t, s, nt: NonTarget, op_dtype=None):
    """``dL/dW`` (C, D) in the centers' dtype and layout (``margin_ce_center_grad``), written once."""
    B, D = x.shape
    C = w.shape[0]
    dw = torch.empty_like(w)
    if B == 0 or C == 0:
        return dw.zero_()
    # every tensor whose pointer goes to the kernel is bound to a name: a temporary would be freed first
    lse, gr, coef = lse.contiguous(), gr.contiguous(), coef.contiguous()
    gscale = grad_scale(gr, coef, s)
    _cuda_ext.call(
        "margin_ce_center_grad", x, _cuda_ext.dtype_code(x), x.data_ptr(), w.data_ptr(), rx.data_ptr(), rw.data_ptr(),
        labels.data_ptr(), lse.data_ptr(), gr.data_ptr(), coef.data_ptr(), gscale.data_ptr(), dw.data_ptr(), B, C, D,
        _strides(x, w), dw.stride(0), dw.stride(1), float(s), float(nt.tau if nt.tau is not None else 0.0),
        nt.tau is not None, float(nt.cos_clamp),
    )  # fmt: skip
    return dw


def target_terms(x, w, labels_k, rx, rw, m2, m3, s, m1, fallback, grad):
    """The CUDA row kernel (csrc/margin_target.cu): ``(raw_t, z_t, slope)`` in one launch, one warp per
    row (rows with ``labels_k < 0``: zeros); ``m2``, ``m3``: ``(B,)`` device tensors (no host read). Same
    values as the torch target terms in fp32."""
    B, D = x.shape
    raw, z, slope = (torch.empty(B, dtype=torch.float32, device=x.device) for _ in range(3))
    m2 = m2.to(torch.float32).expand(B).contiguous()
    m3 = m3.to(torch.float32).expand(B).contiguous()
    _cuda_ext.call(
        "margin_target_forward", x, _cuda_ext.dtype_code(x), x.data_ptr(), w.data_ptr(), labels_k.data_ptr(),
        rx.data_ptr(), rw.data_ptr(), m2.data_ptr(), m3.data_ptr(), raw.data_ptr(), z.data_ptr(), slope.data_ptr(), B,
        D, _strides(x, w), float(s), float(m1), bool(fallback), grad == "straight_through",
    )  # fmt: skip
    return raw, z, slope
