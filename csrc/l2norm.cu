// One thread block per row: a strided pass accumulates fp32 sums, a block reduction combines them,
// a second strided pass writes. Rows of face-recognition embeddings/centers are short (D = 128..1024),
// so 128 threads per row keeps every thread busy with 1-8 elements and many rows in flight per SM.
#include "l2norm.h"
#include "block_reduce.h"

namespace mdk {
namespace {

constexpr int kThreads = 128;

template <typename T>
__global__ void l2norm_forward_kernel(const T* __restrict__ x, T* __restrict__ y, float* __restrict__ rnorm,
                                      int64_t dim, int64_t xs, int64_t ys, float eps) {
  __shared__ float shared[1][kThreads / 32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * xs;
  float v[1] = {0.f};
  for (int64_t k = threadIdx.x; k < dim; k += kThreads) {
    const float a = to_float(xr[k]);
    v[0] += a * a;
  }
  block_sum<1, kThreads>(v, shared);
  const float inv = 1.f / fmaxf(sqrtf(v[0]), eps);
  if (threadIdx.x == 0) rnorm[row] = inv;
  if (y != nullptr) {
    T* yr = y + row * ys;
    for (int64_t k = threadIdx.x; k < dim; k += kThreads) yr[k] = from_float<T>(to_float(xr[k]) * inv);
  }
}

template <typename T, typename TG>
__global__ void l2norm_backward_kernel(const T* __restrict__ x, const TG* dy, T* dx, int64_t dim, int64_t xs,
                                       int64_t dys, int64_t dxs, float eps) {
  __shared__ float shared[2][kThreads / 32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * xs;
  const TG* dyr = dy + row * dys;
  float v[2] = {0.f, 0.f};  // ||x||^2, <x, dy>
  for (int64_t k = threadIdx.x; k < dim; k += kThreads) {
    const float a = to_float(xr[k]);
    v[0] += a * a;
    v[1] += a * to_float(dyr[k]);
  }
  block_sum<2, kThreads>(v, shared);
  const float norm = sqrtf(v[0]);
  const bool clamped = norm < eps;  // y = x / eps is linear in x: no projection term
  const float inv = 1.f / fmaxf(norm, eps);
  const float proj = clamped ? 0.f : v[1] * inv * inv;  // <y, dy> / ||x||
  T* dxr = dx + row * dxs;
  for (int64_t k = threadIdx.x; k < dim; k += kThreads) {
    const float g = to_float(dyr[k]);
    dxr[k] = from_float<T>((g - to_float(xr[k]) * proj) * inv);
  }
}

template <typename T>
void forward_impl(const void* x, void* y, float* rnorm, int64_t rows, int64_t dim, int64_t xs, int64_t ys,
                  float eps, cudaStream_t stream) {
  if (rows == 0) return;
  MDK_LAUNCH(l2norm_forward_kernel<T>, static_cast<unsigned>(rows), kThreads, 0, stream)(
      static_cast<const T*>(x), static_cast<T*>(y), rnorm, dim, xs, ys, eps);
  check_launch("l2norm_forward");
}

template <typename T, typename TG>
void backward_impl(const void* x, const void* dy, void* dx, int64_t rows, int64_t dim, int64_t xs, int64_t dys,
                   int64_t dxs, float eps, cudaStream_t stream) {
  if (rows == 0) return;
  auto kernel = l2norm_backward_kernel<T, TG>;
  MDK_LAUNCH(kernel, static_cast<unsigned>(rows), kThreads, 0, stream)(
      static_cast<const T*>(x), static_cast<const TG*>(dy), static_cast<T*>(dx), dim, xs, dys, dxs, eps);
  check_launch("l2norm_backward");
}

}  // namespace

void l2norm_forward(DType dtype, const void* x, void* y, float* rnorm, int64_t rows, int64_t dim,
                    int64_t xs, int64_t ys, float eps, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return forward_impl<float>(x, y, rnorm, rows, dim, xs, ys, eps, stream);
    case DType::kFloat16: return forward_impl<__half>(x, y, rnorm, rows, dim, xs, ys, eps, stream);
    case DType::kBFloat16: return forward_impl<__nv_bfloat16>(x, y, rnorm, rows, dim, xs, ys, eps, stream);
  }
  throw std::invalid_argument("l2norm_forward: unsupported dtype code");
}

void l2norm_backward(DType dtype, bool dy_f32, const void* x, const void* dy, void* dx, int64_t rows, int64_t dim,
                     int64_t xs, int64_t dys, int64_t dxs, float eps, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return backward_impl<float, float>(x, dy, dx, rows, dim, xs, dys, dxs, eps, stream);
    case DType::kFloat16:
      return dy_f32 ? backward_impl<__half, float>(x, dy, dx, rows, dim, xs, dys, dxs, eps, stream)
                    : backward_impl<__half, __half>(x, dy, dx, rows, dim, xs, dys, dxs, eps, stream);
    case DType::kBFloat16:
      return dy_f32 ? backward_impl<__nv_bfloat16, float>(x, dy, dx, rows, dim, xs, dys, dxs, eps, stream)
                    : backward_impl<__nv_bfloat16, __nv_bfloat16>(x, dy, dx, rows, dim, xs, dys, dxs, eps, stream);
  }
  throw std::invalid_argument("l2norm_backward: unsupported dtype code");
}

}  // namespace mdk
