// Angular distillation (ShrinkTeaNet, docs/math.md §4) row kernels: loss_r = (1 - cos(s_r, t_r))^p.
#pragma once

#include <cstdint>

#include "common.h"

namespace mdk {

// Per row: loss, |s|, |t|, cos (fp32). One read of s and t.
void angular_forward(DType dtype, const void* s, const void* t, float* loss, float* ns, float* nt, float* cos,
                     int64_t rows, int64_t dim, int64_t s_stride, int64_t t_stride, float p, cudaStream_t stream);

// ds_r = g_r * dloss/dcos * (t/|t| - cos s/|s|) / |s|   (n(s) linear where |s| < eps). One read of s and t.
void angular_backward(DType dtype, const void* s, const void* t, const float* g, const float* ns, const float* nt,
                      const float* cos, void* ds, int64_t rows, int64_t dim, int64_t s_stride, int64_t t_stride,
                      float p, cudaStream_t stream);

}  // namespace mdk
