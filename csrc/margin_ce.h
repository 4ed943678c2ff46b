// Fused margin-softmax cross-entropy core: non-target logsumexp (forward) and dX^/dW^ (backward).
#pragma once

#include <cstdint>

#include "common.h"

namespace mdk {

struct MarginArgs {
  const void* x;          // (B, D) embeddings, row stride sx
  const void* w;          // (C, D) centers, row stride sw
  const float* rx;        // (B,) 1 / max(|x_i|, eps)
  const float* rw;        // (C,) 1 / max(|w_j|, eps)
  const int64_t* labels;  // (B,) target class, or -1 (no column masked)
  int64_t B, C, D, sx, sw;
  float s, tau;
  bool has_filter;
};

int64_t margin_tile_classes();  // classes per tile: split sizes must be multiples of it

// Per (class split, row): running max m_out[split * B + row] and sum-exp l_out of s*cos over non-target
// classes of the split [split * per_split, (split + 1) * per_split).
void margin_lse_forward(DType dtype, const MarginArgs& a, float* m_out, float* l_out, int64_t splits,
                        int64_t per_split, cudaStream_t stream);

// dxh (B, D) += G n(W); dwh (C, D) += G^T n(x) when dwh is not null; both fp32, zero-initialised by the
// caller. G = s * exp(s*c - lse) * gr over kept non-target entries. *gscale (a device scalar, > 0) is
// max |gr|: G is formed as G / *gscale (in [0, s], safe for fp16 operands) and the sums scaled back.
void margin_ce_backward(DType dtype, const MarginArgs& a, const float* lse, const float* gr, const float* gscale,
                        float* dxh, float* dwh, cudaStream_t stream);

}  // namespace mdk
