// Fused margin-softmax cross-entropy core (SPEC section 1), CUDA C++: the non-target logsumexp per row
// (forward) and dx^ / dW^ accumulation (backward), never materialising B x C.
//
// Tiling: a block owns BM = 64 rows x BN = 64 classes, 128 threads (4 warps). The cosine tile
// acc = x_tile . w_tile^T is built over D in BK = 32 steps from shared memory: tensor cores (WMMA
// 16x16x16, fp32 accumulation) for bf16/fp16, fp32 FMAs (SIMT) for fp32. Each warp owns a 32x32 quarter.
// The tile goes to shared memory as fp32. The epilogue scales by 1/|x_i| and 1/|w_j|, clamps, applies
// the filter, masks the target column and out-of-range entries, then either updates a per-row online
// logsumexp (forward; two threads per row, merged at the end) or forms
// G = s * exp(s*c - lse) * grad_row / max|grad_row| (backward). The backward's products
// dX^ += G n(W) and dW^ += G^T n(x) run per BK chunk of D on tensor cores for bf16/fp16 (G and the
// normalised tiles as 16-bit operands, each warp a 16-row slice of both) and as SIMT FMAs for fp32; the
// chunks go to global memory with fp32 atomics (other blocks add to the same rows and classes).
#include <mma.h>

#include <cstring>
#include <type_traits>

#include "margin_ce.h"
#include "margin_math.h"

namespace mdk {
namespace {

constexpr int BM = 64, BN = 64, BK = 32, kThreads = 128;
// Shared row stride of the x / w tiles: 16-bit tiles feed WMMA (ldm a multiple of 8 elements); fp32 rows
// are padded by one word so that the SIMT tile reads 8 different rows per warp without bank conflicts.
template <typename T>
constexpr int kLds = std::is_same<T, float>::value ? BK + 1 : BK + 8;
constexpr int LDC = BN + 4;   // shared row stride of the fp32 accumulator tile
constexpr int LDG = BN + 8;   // shared row stride of the 16-bit G tile (backward)
static_assert(2 * BK <= BN, "the backward stages its dX^ and dW^ chunks side by side in the cs tile");
static_assert(BM == BN && BM == 16 * (kThreads / 32), "one 16-row slice of each product per warp");

template <typename T>
struct TileSmem {
  T xs[BM][kLds<T>];
  T ws[BN][kLds<T>];
  float cs[BM][LDC];
};

// Visits rows [r0, r0 + R) x cols [k0, k0 + BK) of a row-major matrix: store(r, k, global row, value,
// in range), zero outside it. vec: 16-byte loads of 16 / sizeof(T) elements (the launcher checked that
// D, the row stride and the base pointer allow them), else one element per load.
template <typename T, int R, typename Store>
__device__ inline void visit_tile(const T* __restrict__ src, int64_t r0, int64_t rows, int64_t k0, int64_t dim,
                                  int64_t stride, bool vec, Store store) {
  constexpr int V = 16 / sizeof(T);
  if (vec) {
    for (int e = threadIdx.x; e < R * BK / V; e += kThreads) {
      const int r = e / (BK / V), k = (e % (BK / V)) * V;
      const int64_t gr = r0 + r, gk = k0 + k;
      const bool in = gr < rows && gk < dim;  // dim % V == 0: a vector is wholly in or out
      const uint4 bits = in ? *reinterpret_cast<const uint4*>(src + gr * stride + gk) : make_uint4(0u, 0u, 0u, 0u);
      T v[V];
      memcpy(v, &bits, sizeof(bits));  // not a pointer cast: that would break strict aliasing
#pragma unroll
      for (int i = 0; i < V; ++i) store(r, k + i, gr, v[i], in);
    }
  } else {
    for (int e = threadIdx.x; e < R * BK; e += kThreads) {
      const int r = e / BK, k = e % BK;
      const int64_t gr = r0 + r, gk = k0 + k;
      const bool in = gr < rows && gk < dim;
      store(r, k, gr, in ? src[gr * stride + gk] : from_float<T>(0.f), in);
    }
  }
}

// Loads the tile into shared memory as stored, zero-filled.
template <typename T, int R>
__device__ inline void load_tile(T (*dst)[kLds<T>], const T* __restrict__ src, int64_t r0, int64_t rows, int64_t k0,
                                 int64_t dim, int64_t stride, bool vec) {
  visit_tile<T, R>(src, r0, rows, k0, dim, stride, vec, [&](int r, int k, int64_t, T v, bool) { dst[r][k] = v; });
}

// acc tile (fp32, in smem.cs) = x[r0:r0+BM] . w[c0:c0+BN]^T over all of D.
template <typename T>
__device__ void cos_tile(TileSmem<T>& sm, const T* __restrict__ x, const T* __restrict__ w, int64_t r0, int64_t c0,
                         int64_t B, int64_t C, int64_t D, int64_t sx, int64_t sw, bool vec) {
  using namespace nvcuda;
  const int warp = threadIdx.x / 32;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;  // this warp's 32x32 quarter
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  for (int64_t k0 = 0; k0 < D; k0 += BK) {
    load_tile<T, BM>(sm.xs, x, r0, B, k0, D, sx, vec);
    load_tile<T, BN>(sm.ws, w, c0, C, k0, D, sw, vec);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], &sm.xs[wm + 16 * i][kk], kLds<T>);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], &sm.ws[wn + 16 * j][kk], kLds<T>);  // W^T, col-major
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(&sm.cs[wm + 16 * i][wn + 16 * j], acc[i][j], LDC, wmma::mem_row_major);
  __syncthreads();
}

// fp32: the same tile with FMAs (IEEE fp32, no TF32). Thread t computes rows 4 (t / 8) + i and columns
// t % 8 + 8 j (i < 4, j < 8): a warp reads 4 rows of xs (broadcast) and 8 consecutive rows of ws, which the
// one-word padding puts in 8 different banks.
template <>
__device__ void cos_tile<float>(TileSmem<float>& sm, const float* __restrict__ x, const float* __restrict__ w,
                                int64_t r0, int64_t c0, int64_t B, int64_t C, int64_t D, int64_t sx, int64_t sw,
                                bool vec) {
  const int tr = (threadIdx.x / 8) * 4, tc = threadIdx.x % 8;  // 16 x 8 threads, 4 x 8 outputs each
  float acc[4][8] = {};
  for (int64_t k0 = 0; k0 < D; k0 += BK) {
    load_tile<float, BM>(sm.xs, x, r0, B, k0, D, sx, vec);
    load_tile<float, BN>(sm.ws, w, c0, C, k0, D, sw, vec);
    __syncthreads();
#pragma unroll 4
    for (int k = 0; k < BK; ++k) {
      float a[4], b[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = sm.xs[tr + i][k];
#pragma unroll
      for (int j = 0; j < 8; ++j) b[j] = sm.ws[tc + 8 * j][k];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) sm.cs[tr + i][tc + 8 * j] = acc[i][j];
  __syncthreads();
}

// Scaled, clamped, filtered cosine of tile entry (r, c); *keep says whether it carries a gradient.
__device__ inline float tile_cos(float raw, float rx, float rw, bool has_filter, float tau, bool* keep) {
  const float c = raw * rx * rw;
  const float cc = clamp_cos(c);
  bool k = (c >= -1.f && c <= 1.f);
  if (has_filter && cc > tau) {
    *keep = false;
    return 0.f;
  }
  *keep = k;
  return cc;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) margin_lse_forward_kernel(
    const T* __restrict__ x, const T* __restrict__ w, const float* __restrict__ rx, const float* __restrict__ rw,
    const int64_t* __restrict__ labels, float* m_out, float* l_out, int64_t B, int64_t C, int64_t D, int64_t sx,
    int64_t sw, int64_t classes_per_split, float s, float tau, bool has_filter, bool vec) {
  MDK_DYNAMIC_SMEM(smem_raw);  // 128-byte aligned: WMMA pointers need 32
  TileSmem<T>& sm = *reinterpret_cast<TileSmem<T>*>(smem_raw);
  const int64_t r0 = int64_t(blockIdx.x) * BM;
  const int64_t c_begin = int64_t(blockIdx.y) * classes_per_split;
  const int64_t c_end = c_begin + classes_per_split < C ? c_begin + classes_per_split : C;
  const int my_row = threadIdx.x / 2, half = threadIdx.x % 2;  // two threads per row, 32 columns each
  const int64_t grow = r0 + my_row;
  const int64_t y = grow < B ? labels[grow] : -1;
  const float rxi = grow < B ? rx[grow] : 0.f;
  LseState<float> st = LseState<float>::empty();
  for (int64_t c0 = c_begin; c0 < c_end; c0 += BN) {
    cos_tile<T>(sm, x, w, r0, c0, B, c_end, D, sx, sw, vec);
    if (grow < B) {
      for (int j = half * (BN / 2); j < (half + 1) * (BN / 2); ++j) {
        const int64_t col = c0 + j;
        if (col >= c_end || col == y) continue;
        bool keep;
        st.push(s * tile_cos(sm.cs[my_row][j], rxi, rw[col], has_filter, tau, &keep));
      }
    }
    __syncthreads();  // cs is overwritten by the next tile
  }
  // merge the two halves of each row (adjacent lanes)
  LseState<float> other;
  other.m = __shfl_xor_sync(0xffffffffu, st.m, 1);
  other.l = __shfl_xor_sync(0xffffffffu, st.l, 1);
  st.merge(other);
  if (half == 0 && grow < B) {
    m_out[int64_t(blockIdx.y) * B + grow] = st.m;
    l_out[int64_t(blockIdx.y) * B + grow] = st.l;
  }
}

// Backward shared memory: the forward's tiles plus, for 16-bit inputs, G as a tensor-core operand.
template <typename T>
struct BwdSmem : TileSmem<T> {
  T gs[BM][LDG];
};
template <>
struct BwdSmem<float> : TileSmem<float> {};

// Loads like load_tile, rows scaled by scale[row] = 1/|row| in fp32 before the rounding to T: the
// normalised rows, within [-1, 1] whatever the norms (a zero row stays zero), as 16-bit operands.
template <typename T, int R>
__device__ inline void load_tile_normalised(T (*dst)[kLds<T>], const T* __restrict__ src,
                                            const float* __restrict__ scale, int64_t r0, int64_t rows, int64_t k0,
                                            int64_t dim, int64_t stride, bool vec) {
  visit_tile<T, R>(src, r0, rows, k0, dim, stride, vec, [&](int r, int k, int64_t gr, T v, bool in) {
    dst[r][k] = from_float<T>(in ? to_float(v) * scale[gr] : 0.f);
  });
}

// Adds the staged fp32 products (sm.cs) to dX^ (columns [0, BK)) and dW^ (columns [BK, 2 BK)), times gscale.
__device__ inline void flush_products(const float (*cs)[LDC], float* dxh, float* dwh, int64_t r0, int64_t c0,
                                      int64_t k0, int64_t B, int64_t C, int64_t D, float gscale) {
  for (int e = threadIdx.x; e < BM * BK; e += kThreads) {
    const int r = e / BK, k = e % BK;
    const int64_t grow = r0 + r, gk = k0 + k;
    const float v = cs[r][k];
    if (grow < B && gk < D && v != 0.f) atomicAdd(&dxh[grow * D + gk], v * gscale);
  }
  if (dwh == nullptr) return;
  for (int e = threadIdx.x; e < BN * BK; e += kThreads) {
    const int j = e / BK, k = e % BK;
    const int64_t col = c0 + j, gk = k0 + k;
    const float v = cs[j][BK + k];
    if (col < C && gk < D && v != 0.f) atomicAdd(&dwh[col * D + gk], v * gscale);
  }
}

// G = s * exp(s*c - lse) * gr / gscale on kept, non-target, in-range entries (0 elsewhere). Dividing by
// gscale = max |gr| keeps G in [0, s] whatever the reduction: fp16 operands would flush 1/B-sized
// values to zero. The products are multiplied back by gscale in fp32.
__device__ inline float grad_entry(float raw, int64_t grow, int64_t col, int64_t B, int64_t C,
                                   const int64_t* __restrict__ labels, const float* __restrict__ rx,
                                   const float* __restrict__ rw, const float* __restrict__ lse,
                                   const float* __restrict__ gr, float inv_gscale, float s, float tau,
                                   bool has_filter) {
  if (grow >= B || col >= C || col == labels[grow]) return 0.f;
  bool keep;
  const float c = tile_cos(raw, rx[grow], rw[col], has_filter, tau, &keep);
  return keep ? s * (gr[grow] * inv_gscale) * __expf(s * c - lse[grow]) : 0.f;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) margin_ce_backward_kernel(
    const T* __restrict__ x, const T* __restrict__ w, const float* __restrict__ rx, const float* __restrict__ rw,
    const int64_t* __restrict__ labels, const float* __restrict__ lse, const float* __restrict__ gr,
    const float* __restrict__ gscale_ptr, float* dxh, float* dwh, int64_t B, int64_t C, int64_t D, int64_t sx,
    int64_t sw, float s, float tau, bool has_filter, bool vec) {
  MDK_DYNAMIC_SMEM(smem_raw);  // 128-byte aligned: WMMA pointers need 32
  BwdSmem<T>& sm = *reinterpret_cast<BwdSmem<T>*>(smem_raw);
  const int64_t c0 = int64_t(blockIdx.x) * BN;  // class tiles on grid axis x (no 65535 limit)
  const int64_t r0 = int64_t(blockIdx.y) * BM;
  // skip tiles whose rows all have zero weight (ignored rows)
  __shared__ int any_weight;
  if (threadIdx.x == 0) any_weight = 0;
  __syncthreads();
  if (threadIdx.x < BM && r0 + threadIdx.x < B && gr[r0 + threadIdx.x] != 0.f) any_weight = 1;
  __syncthreads();
  if (!any_weight) return;
  const float gscale = *gscale_ptr, inv_gscale = 1.f / gscale;
  cos_tile<T>(sm, x, w, r0, c0, B, C, D, sx, sw, vec);
  if constexpr (std::is_same<T, float>::value) {
    // fp32: G stays fp32 in cs; the products run as FMAs from shared memory (IEEE fp32, like the forward)
    for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
      const int r = e / BN, j = e % BN;
      sm.cs[r][j] = grad_entry(sm.cs[r][j], r0 + r, c0 + j, B, C, labels, rx, rw, lse, gr, inv_gscale, s, tau,
                               has_filter);
    }
    __syncthreads();
    // dX^[rows, k] += sum_j G[r, j] * w[j, k] / |w_j|;  dW^[cols, k] += sum_r G[r, j] * x[r, k] / |x_r|
    for (int64_t k0 = 0; k0 < D; k0 += BK) {
      load_tile<T, BM>(sm.xs, x, r0, B, k0, D, sx, vec);
      load_tile<T, BN>(sm.ws, w, c0, C, k0, D, sw, vec);
      __syncthreads();
      for (int e = threadIdx.x; e < BM * BK; e += kThreads) {
        const int r = e / BK, k = e % BK;
        const int64_t grow = r0 + r, gk = k0 + k;
        if (grow >= B || gk >= D) continue;
        float acc = 0.f;
        for (int j = 0; j < BN && c0 + j < C; ++j) acc += sm.cs[r][j] * rw[c0 + j] * sm.ws[j][k];
        if (acc != 0.f) atomicAdd(&dxh[grow * D + gk], acc * gscale);
      }
      if (dwh != nullptr) {
        for (int e = threadIdx.x; e < BN * BK; e += kThreads) {
          const int j = e / BK, k = e % BK;
          const int64_t col = c0 + j, gk = k0 + k;
          if (col >= C || gk >= D) continue;
          float acc = 0.f;
          for (int r = 0; r < BM && r0 + r < B; ++r) acc += sm.cs[r][j] * rx[r0 + r] * sm.xs[r][k];
          if (acc != 0.f) atomicAdd(&dwh[col * D + gk], acc * gscale);
        }
      }
      __syncthreads();
    }
  } else {
    // 16-bit: G goes to shared memory in T; both products on tensor cores over normalised tiles:
    // dX^ chunk (BM x BK) = G . n(W)[:, chunk], dW^ chunk (BN x BK) = G^T . n(x)[:, chunk]. Every operand
    // is bounded (|G| <= s, |n(.)| <= 1), so no norm can push an fp16 operand to inf or to zero.
    using namespace nvcuda;
    for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
      const int r = e / BN, j = e % BN;
      sm.gs[r][j] = from_float<T>(grad_entry(sm.cs[r][j], r0 + r, c0 + j, B, C, labels, rx, rw, lse, gr,
                                             inv_gscale, s, tau, has_filter));
    }
    const int warp = threadIdx.x / 32;  // warp w: rows [16w, 16w + 16) of both products, all BK columns
    for (int64_t k0 = 0; k0 < D; k0 += BK) {
      load_tile_normalised<T, BM>(sm.xs, x, rx, r0, B, k0, D, sx, vec);
      load_tile_normalised<T, BN>(sm.ws, w, rw, c0, C, k0, D, sw, vec);
      __syncthreads();  // tiles and (first pass) G written; the previous flush has read cs
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> ax[2], aw[2];
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        wmma::fill_fragment(ax[n], 0.f);
        wmma::fill_fragment(aw[n], 0.f);
      }
#pragma unroll
      for (int kk = 0; kk < BN; kk += 16) {  // dX: reduce over the tile's classes
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> g;
        wmma::load_matrix_sync(g, &sm.gs[16 * warp][kk], LDG);
#pragma unroll
        for (int n = 0; n < 2; ++n) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> wt;
          wmma::load_matrix_sync(wt, &sm.ws[kk][16 * n], kLds<T>);
          wmma::mma_sync(ax[n], g, wt, ax[n]);
        }
      }
      if (dwh != nullptr) {
#pragma unroll
        for (int kk = 0; kk < BM; kk += 16) {  // dW: reduce over the tile's rows; G^T is G col-major
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> gt;
          wmma::load_matrix_sync(gt, &sm.gs[kk][16 * warp], LDG);
#pragma unroll
          for (int n = 0; n < 2; ++n) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> xt;
            wmma::load_matrix_sync(xt, &sm.xs[kk][16 * n], kLds<T>);
            wmma::mma_sync(aw[n], gt, xt, aw[n]);
          }
        }
      }
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        wmma::store_matrix_sync(&sm.cs[16 * warp][16 * n], ax[n], LDC, wmma::mem_row_major);
        wmma::store_matrix_sync(&sm.cs[16 * warp][BK + 16 * n], aw[n], LDC, wmma::mem_row_major);
      }
      __syncthreads();  // products staged; the tiles may be overwritten after the flush
      flush_products(sm.cs, dxh, dwh, r0, c0, k0, B, C, D, gscale);
    }
  }
}

// 16-byte tile loads need D and both row strides to be multiples of 16 / sizeof(T) elements and 16-byte
// aligned base pointers (torch's allocations are; a view at an odd offset falls back to scalar loads).
template <typename T>
bool vectorizable(const MarginArgs& a) {
  constexpr int64_t V = 16 / sizeof(T);
  const auto aligned = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; };
  return a.D % V == 0 && a.sx % V == 0 && a.sw % V == 0 && aligned(a.x) && aligned(a.w);
}

// Every tile fits the default 48 KiB of dynamic shared memory: no cudaFuncSetAttribute per launch.
static_assert(sizeof(TileSmem<float>) <= 48 * 1024 && sizeof(TileSmem<__half>) <= 48 * 1024, "forward smem");
static_assert(sizeof(BwdSmem<float>) <= 48 * 1024 && sizeof(BwdSmem<__half>) <= 48 * 1024, "backward smem");

template <typename T>
void forward_impl(const MarginArgs& a, float* m_out, float* l_out, int64_t splits, int64_t per_split,
                  cudaStream_t stream) {
  if (a.B == 0) return;
  const size_t smem = sizeof(TileSmem<T>);
  auto kernel = margin_lse_forward_kernel<T>;
  const dim3 grid(static_cast<unsigned>((a.B + BM - 1) / BM), static_cast<unsigned>(splits));
  MDK_LAUNCH(kernel, grid, kThreads, smem, stream)(static_cast<const T*>(a.x), static_cast<const T*>(a.w), a.rx, a.rw,
                                           a.labels, m_out, l_out, a.B, a.C, a.D, a.sx, a.sw, per_split, a.s,
                                           a.tau, a.has_filter, vectorizable<T>(a));
  check_launch("margin_lse_forward");
}

template <typename T>
void backward_impl(const MarginArgs& a, const float* lse, const float* gr, const float* gscale, float* dxh,
                   float* dwh, cudaStream_t stream) {
  if (a.B == 0 || a.C == 0) return;
  const size_t smem = sizeof(BwdSmem<T>);
  auto kernel = margin_ce_backward_kernel<T>;
  const dim3 grid(static_cast<unsigned>((a.C + BN - 1) / BN), static_cast<unsigned>((a.B + BM - 1) / BM));
  MDK_LAUNCH(kernel, grid, kThreads, smem, stream)(static_cast<const T*>(a.x), static_cast<const T*>(a.w), a.rx, a.rw,
                                           a.labels, lse, gr, gscale, dxh, dwh, a.B, a.C, a.D, a.sx, a.sw, a.s, a.tau,
                                           a.has_filter, vectorizable<T>(a));
  check_launch("margin_ce_backward");
}

}  // namespace

int64_t margin_tile_classes() { return BN; }

void margin_lse_forward(DType dtype, const MarginArgs& a, float* m_out, float* l_out, int64_t splits,
                        int64_t per_split, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return forward_impl<float>(a, m_out, l_out, splits, per_split, stream);
    case DType::kFloat16: return forward_impl<__half>(a, m_out, l_out, splits, per_split, stream);
    case DType::kBFloat16: return forward_impl<__nv_bfloat16>(a, m_out, l_out, splits, per_split, stream);
  }
  throw std::invalid_argument("margin_lse_forward: unsupported dtype code");
}

void margin_ce_backward(DType dtype, const MarginArgs& a, const float* lse, const float* gr, const float* gscale,
                        float* dxh, float* dwh, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return backward_impl<float>(a, lse, gr, gscale, dxh, dwh, stream);
    case DType::kFloat16: return backward_impl<__half>(a, lse, gr, gscale, dxh, dwh, stream);
    case DType::kBFloat16: return backward_impl<__nv_bfloat16>(a, lse, gr, gscale, dxh, dwh, stream);
  }
  throw std::invalid_argument("margin_ce_backward: unsupported dtype code");
}

}  // namespace mdk
