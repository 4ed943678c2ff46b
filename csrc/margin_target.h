// The target logit of the margin softmax (SPEC section 1) on (B,) vectors: gather-dot of each row with
// its own center, then the margin function of csrc/margin_math.h.
#pragma once

#include <cstdint>

#include "common.h"

namespace mdk {

// Per row i with labels[i] >= 0: raw[i] = <x_i, w_{y_i}> / (|x_i| |w_{y_i}|) (unclamped; rx, rw are the
// inverse norms), z[i] = s * (cos(m1 * acos(c) + m2[i]) - m3) and slope[i] = dz/dc at c = clamp(raw[i]),
// with the fallback and straight-through options of margin_target. Rows with labels[i] < 0: all 0.
void margin_target_forward(DType dtype, const void* x, const void* w, const int64_t* labels, const float* rx,
                           const float* rw, const float* m2, float* raw, float* z, float* slope, int64_t B,
                           int64_t D, int64_t x_stride, int64_t w_stride, float s, float m1, float m3,
                           bool fallback, bool straight_through, cudaStream_t stream);

}  // namespace mdk
