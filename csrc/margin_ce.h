// Fused margin-softmax cross-entropy core, flash-style: forward statistics with the dx accumulator, and dW.
#pragma once

#include <cstdint>

#include "common.h"

namespace mdk {

struct MarginArgs {
  const void* x;          // (B, D) embeddings, strides (sx, sxc)
  const void* w;          // (C, D) centers, strides (sw, swc): pytorch-metric-learning's (D, C) parameter's view
  const float* rx;        // (B,) 1 / max(|x_i|, eps)
  const float* rw;        // (C,) 1 / max(|w_j|, eps)
  const int64_t* labels;  // (B,) target class, or -1 (no column masked)
  int64_t B, C, D, sx, sw, sxc, swc;
  float s, tau;
  bool has_filter;
  float bound;  // every cosine is clamped to [-bound, bound] (1; AdaFace 1 - 1e-3), no gradient outside
};

int64_t margin_tile_classes();  // classes per tile: split sizes must be multiples of it
// Dynamic shared memory of a forward (or center-gradient) block with 256 or 128 accumulator columns: the
// launcher takes 256 where the device's opt-in limit holds it, else 128, else refuses.
int64_t margin_smem_bytes(DType dtype, bool forward, int accumulator_columns);

// Per (class split, row): running max m_out[split * B + row] and sum-exp l_out of s*cos over the non-target
// classes of the split [split * per_split, (split + 1) * per_split), and, when o_out is not null,
// o_out[(split * B + row) * D + d] = sum_j exp(s*c_j - m) n(w_j)[d] over the entries that pass a gradient.
void margin_ce_forward(DType dtype, const MarginArgs& a, float* m_out, float* l_out, float* o_out, int64_t splits,
                       int64_t per_split, cudaStream_t stream);

// dw (C, D, strides (dw_row_stride, dw_col_stride), the centers' dtype) = dL/dW, written once: G = dL/dc is
// s * gr * exp(s*c - lse) on kept non-target entries and coef[row] at the target; *gscale (a device
// scalar, > 0) bounds |G| / s: G enters the tensor-core products as G / *gscale.
void margin_ce_center_grad(DType dtype, const MarginArgs& a, const float* lse, const float* gr, const float* coef,
                           const float* gscale, void* dw, int64_t dw_row_stride, int64_t dw_col_stride,
                           cudaStream_t stream);

}  // namespace mdk
