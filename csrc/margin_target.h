// The target logit of the margin softmax (docs/math.md §1) on (B,) vectors: gather-dot of each row with
// its own center, then the margin function of csrc/margin_math.h.
#pragma once

#include <cstdint>

#include "common.h"

namespace mdk {

struct MarginTargetArgs {
  const void* x;          // (B, D), strides (sx, sxc)
  const void* w;          // (C, D), strides (sw, swc)
  const int64_t* labels;  // (B,) the target class, or < 0
  const float* rx;        // (B,) inverse norms of the rows of x
  const float* rw;        // (C,) inverse norms of the rows of w
  const float* m2;        // (B,) additive angular margin per row
  const float* m3;        // (B,) additive cosine margin per row (device memory: no host read of its values)
  float* raw;             // (B,) out
  float* z;               // (B,) out
  float* slope;           // (B,) out
  int64_t B, D, sx, sxc, sw, swc;
  float s, m1;
  bool fallback, straight_through;
};

// Per row i with labels[i] >= 0: raw[i] = <x_i, w_{y_i}> / (|x_i| |w_{y_i}|) (unclamped; rx, rw are the
// inverse norms), z[i] = s * (cos(m1 * acos(c) + m2[i]) - m3[i]) and slope[i] = dz/dc at c = clamp(raw[i]),
// with the fallback and straight-through options of margin_target. Rows with labels[i] < 0: all 0.
void margin_target_forward(DType dtype, const MarginTargetArgs& args, cudaStream_t stream);

}  // namespace mdk
