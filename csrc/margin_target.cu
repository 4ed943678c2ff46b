// One warp per row: the dot of x_i with w_{y_i} in fp32 (strided over D, then a shuffle reduction), and
// lane 0 applies the margin (csrc/margin_math.h, the same code the host test checks). Replaces the
// gather, the dot and the ~10 elementwise torch kernels of the margin on (B,) vectors.
#include "margin_math.h"
#include "margin_target.h"

namespace mdk {
namespace {

constexpr int kWarps = 4, kThreads = 32 * kWarps;

template <typename T>
__global__ void __launch_bounds__(kThreads) margin_target_kernel(
    const T* __restrict__ x, const T* __restrict__ w, const int64_t* __restrict__ labels,
    const float* __restrict__ rx, const float* __restrict__ rw, const float* __restrict__ m2,
    const float* __restrict__ m3, float* raw, float* z, float* slope, int64_t B, int64_t D, int64_t sx, int64_t sxc,
    int64_t sw, int64_t swc, float s, float m1, bool fallback, bool straight_through) {
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= B) return;  // whole warps: no block barrier follows
  const int64_t y = labels[row];
  if (y < 0) {
    if (lane == 0) raw[row] = z[row] = slope[row] = 0.f;
    return;
  }
  const T* xr = x + row * sx;
  const T* wr = w + y * sw;
  float acc = 0.f;
  for (int64_t k = lane; k < D; k += 32) acc += to_float(xr[k * sxc]) * to_float(wr[k * swc]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) {
    const float r = acc * rx[row] * rw[y];
    float zz, dz;
    margin_target<float>(clamp_cos(r), s, m1, m2[row], m3[row], fallback, straight_through, &zz, &dz);
    raw[row] = r;
    z[row] = zz;
    slope[row] = dz;
  }
}

template <typename T>
void forward_impl(const MarginTargetArgs& a, cudaStream_t stream) {
  if (a.B == 0) return;
  const unsigned blocks = static_cast<unsigned>((a.B + kWarps - 1) / kWarps);
  MDK_LAUNCH(margin_target_kernel<T>, blocks, kThreads, 0, stream)(
      static_cast<const T*>(a.x), static_cast<const T*>(a.w), a.labels, a.rx, a.rw, a.m2, a.m3, a.raw, a.z, a.slope,
      a.B, a.D, a.sx, a.sxc, a.sw, a.swc, a.s, a.m1, a.fallback, a.straight_through);
  check_launch("margin_target_forward");
}

}  // namespace

void margin_target_forward(DType dtype, const MarginTargetArgs& a, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return forward_impl<float>(a, stream);
    case DType::kFloat16: return forward_impl<__half>(a, stream);
    case DType::kBFloat16: return forward_impl<__nv_bfloat16>(a, stream);
  }
  throw std::invalid_argument("margin_target_forward: unsupported dtype code");
}

}  // namespace mdk
