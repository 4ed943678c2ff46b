// One thread block per row (rows are embeddings or flattened feature maps): a strided pass accumulates
// |s|^2, |t|^2 and <s, t> in fp32, a block reduction combines them. The backward makes one more read.
#include "angular_distill.h"
#include "block_reduce.h"

namespace mdk {
namespace {

constexpr int kThreads = 256;
constexpr float kEps = 1e-12f;

__device__ inline float gap_pow(float gap, float p) { return gap > 0.f ? powf(gap, p) : 0.f; }

template <typename T>
__global__ void angular_forward_kernel(const T* __restrict__ s, const T* __restrict__ t, float* loss, float* ns,
                                       float* nt, float* cos, int64_t dim, int64_t ss, int64_t ts, float p) {
  __shared__ float shared[3][kThreads / 32];
  const int64_t row = blockIdx.x;
  const T* sr = s + row * ss;
  const T* tr = t + row * ts;
  float v[3] = {0.f, 0.f, 0.f};
  for (int64_t k = threadIdx.x; k < dim; k += kThreads) {
    const float a = to_float(sr[k]), b = to_float(tr[k]);
    v[0] += a * a;
    v[1] += b * b;
    v[2] += a * b;
  }
  block_sum<3, kThreads>(v, shared);
  if (threadIdx.x == 0) {
    const float n_s = sqrtf(v[0]), n_t = sqrtf(v[1]);
    const float c = v[2] / (fmaxf(n_s, kEps) * fmaxf(n_t, kEps));
    loss[row] = gap_pow(fmaxf(1.f - c, 0.f), p);
    ns[row] = n_s;
    nt[row] = n_t;
    cos[row] = c;
  }
}

template <typename T>
__global__ void angular_backward_kernel(const T* __restrict__ s, const T* __restrict__ t, const float* g,
                                        const float* ns, const float* nt, const float* cos, T* ds, int64_t dim,
                                        int64_t ss, int64_t ts, float p) {
  const int64_t row = blockIdx.x;
  const float c = cos[row], gap = fmaxf(1.f - c, 0.f);
  const float dcos = (gap > 0.f ? -p * powf(gap, p - 1.f) : (p == 1.f ? -1.f : 0.f)) * g[row];
  const float rs = 1.f / fmaxf(ns[row], kEps), rt = 1.f / fmaxf(nt[row], kEps);
  const float proj = ns[row] < kEps ? 0.f : c * rs;
  const T* sr = s + row * ss;
  const T* tr = t + row * ts;
  T* dr = ds + row * dim;
  for (int64_t k = threadIdx.x; k < dim; k += kThreads) {
    dr[k] = from_float<T>(dcos * (to_float(tr[k]) * rt - to_float(sr[k]) * proj) * rs);
  }
}

template <typename T>
void forward_impl(const void* s, const void* t, float* loss, float* ns, float* nt, float* cos, int64_t rows,
                  int64_t dim, int64_t ss, int64_t ts, float p, cudaStream_t stream) {
  if (rows == 0) return;
  MDK_LAUNCH(angular_forward_kernel<T>, static_cast<unsigned>(rows), kThreads, 0, stream)(
      static_cast<const T*>(s), static_cast<const T*>(t), loss, ns, nt, cos, dim, ss, ts, p);
  check_launch("angular_forward");
}

template <typename T>
void backward_impl(const void* s, const void* t, const float* g, const float* ns, const float* nt, const float* cos,
                   void* ds, int64_t rows, int64_t dim, int64_t ss, int64_t ts, float p, cudaStream_t stream) {
  if (rows == 0) return;
  MDK_LAUNCH(angular_backward_kernel<T>, static_cast<unsigned>(rows), kThreads, 0, stream)(
      static_cast<const T*>(s), static_cast<const T*>(t), g, ns, nt, cos, static_cast<T*>(ds), dim, ss, ts, p);
  check_launch("angular_backward");
}

}  // namespace

void angular_forward(DType dtype, const void* s, const void* t, float* loss, float* ns, float* nt, float* cos,
                     int64_t rows, int64_t dim, int64_t ss, int64_t ts, float p, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return forward_impl<float>(s, t, loss, ns, nt, cos, rows, dim, ss, ts, p, stream);
    case DType::kFloat16: return forward_impl<__half>(s, t, loss, ns, nt, cos, rows, dim, ss, ts, p, stream);
    case DType::kBFloat16:
      return forward_impl<__nv_bfloat16>(s, t, loss, ns, nt, cos, rows, dim, ss, ts, p, stream);
  }
  throw std::invalid_argument("angular_forward: unsupported dtype code");
}

void angular_backward(DType dtype, const void* s, const void* t, const float* g, const float* ns, const float* nt,
                      const float* cos, void* ds, int64_t rows, int64_t dim, int64_t ss, int64_t ts, float p,
                      cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return backward_impl<float>(s, t, g, ns, nt, cos, ds, rows, dim, ss, ts, p, stream);
    case DType::kFloat16: return backward_impl<__half>(s, t, g, ns, nt, cos, ds, rows, dim, ss, ts, p, stream);
    case DType::kBFloat16:
      return backward_impl<__nv_bfloat16>(s, t, g, ns, nt, cos, ds, rows, dim, ss, ts, p, stream);
  }
  throw std::invalid_argument("angular_backward: unsupported dtype code");
}

}  // namespace mdk
