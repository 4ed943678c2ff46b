// Row-wise L2 normalisation, y = x / max(||x||, eps), forward and backward (fp32 accumulation).
#pragma once

#include <cstdint>

#include "common.h"

namespace mdk {

// y may be null: then only rnorm[r] = 1 / max(||x_r||, eps) is written (fp32, one per row).
void l2norm_forward(DType dtype, const void* x, void* y, float* rnorm, int64_t rows, int64_t dim,
                    int64_t x_row_stride, int64_t y_row_stride, float eps, cudaStream_t stream);

// dx = (dy - y <y, dy>) / max(||x||, eps)  (dy / eps where ||x|| < eps, as F.normalize's autograd).
// dy is fp32 when dy_is_float32, else the dtype of x; dx has the dtype of x. dx may alias dy when both
// have the same dtype and strides (each element is read before it is written, by the same thread).
void l2norm_backward(DType dtype, bool dy_is_float32, const void* x, const void* dy, void* dx, int64_t rows,
                     int64_t dim, int64_t x_row_stride, int64_t dy_row_stride, int64_t dx_row_stride, float eps,
                     cudaStream_t stream);

}  // namespace mdk
