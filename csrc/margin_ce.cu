// Fused margin-softmax cross-entropy core (docs/math.md §1), CUDA C++, flash-style (K = V = n(W)):
// never B x C, no atomics in global memory, no fp32 C x D scratch.
//
// Tiling: a block holds BM = 64 rows x BN = 64 classes, 128 threads (4 warps). The cosine tile
// acc = x_tile . w_tile^T is built over D in BK = 32 steps from shared memory: tensor cores (WMMA
// 16x16x16, fp32 accumulation) for bf16/fp16, fp32 FMAs (SIMT) for fp32. It goes to shared memory as fp32;
// each entry is scaled by 1/|x_i| and 1/|w_j|, clamped and filtered (tile_cos).
//
// Forward (margin_ce_forward): a block owns a row tile, a class split and ACC columns of D (the grid's
// third axis splits D above that). Per class tile, two threads per row find the tile's row max, rescale the
// running sum-exp, and write P = exp(s*c - m) in [0, 1] (0 where no gradient passes) as a 16-bit operand;
// then O = O * alpha + P . n(W) over the block's columns, O in shared memory (fp32), on tensor cores for
// 16-bit inputs. The block writes its (m, l, O) partials; the host merges the splits (flash-decoding).
//
// Center gradient (margin_ce_center_grad): a block owns a class tile and ACC columns of D, and loops
// over every row tile: cosines again, G = dL/dc (the target's coefficient in its column) as G / gscale,
// dW^ += G^T . n(x) into shared memory, dot_j += sum_i G_ij c_ij. Its epilogue finishes the normalisation
// backward, dW_j = |w_j|^-1 gscale dW^_j - w_j |w_j|^-2 dot_j, and writes dW once in the centers' dtype.
#include <mma.h>

#include <atomic>
#include <cstring>
#include <string>
#include <type_traits>

#include "margin_ce.h"
#include "margin_math.h"

namespace mdk {
namespace {

constexpr int BM = 64, BN = 64, BK = 32, kThreads = 128;
// ACC, a template parameter: the columns of D one block accumulates (O or dW^) in shared memory, 256 where
// the GPU's opt-in shared memory holds that layout (sm_80, sm_90, sm_100: 163 to 227 KiB), else 128 (sm_86,
// sm_89, sm_120: 99 KiB); the launcher reads the device's limit, never its capability.
template <int ACC>
constexpr int kLda = ACC + 4;  // row stride of the fp32 accumulator (a multiple of 4: WMMA ldm)
constexpr float kZeroRowRw = 0.5e12f;  // 1/|w| at or above this (|w| <= 2 EPS): a zero row, no projection
// Shared row stride of the x / w tiles: 16-bit tiles feed WMMA (ldm a multiple of 8 elements); fp32 rows
// are padded by one word so that the SIMT tile reads 8 different rows per warp without bank conflicts.
template <typename T>
constexpr int kLds = std::is_same<T, float>::value ? BK + 1 : BK + 8;
constexpr int LDC = BN + 4;  // shared row stride of the fp32 cosine tile
constexpr int LDG = BN + 8;  // shared row stride of the 16-bit P / G tile
static_assert(BM == BN && BM == 16 * (kThreads / 32), "one 16-row slice of each product per warp");
static_assert(128 % BK == 0 && 256 % BK == 0, "the accumulator is filled in BK-wide chunks");

// The P (forward) or G (center gradient) tile: a 16-bit WMMA operand, or fp32 for the SIMT path.
template <typename T>
using OperandT = typename std::conditional<std::is_same<T, float>::value, float, T>::type;

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
__device__ __forceinline__ void visit_tile(const T* __restrict__ src, int64_t r0, int64_t rows, int64_t k0, int64_t dim,
                                  int64_t stride, int64_t cstride, bool vec, Store store) {
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
      store(r, k, gr, in ? src[gr * stride + gk * cstride] : from_float<T>(0.f), in);
    }
  }
}

// Loads the tile into shared memory as stored, zero-filled.
template <typename T, int R>
__device__ __forceinline__ void load_tile(T (*dst)[kLds<T>], const T* __restrict__ src, int64_t r0, int64_t rows, int64_t k0,
                                 int64_t dim, int64_t stride, int64_t cstride, bool vec) {
  visit_tile<T, R>(src, r0, rows, k0, dim, stride, cstride, vec,
                   [&](int r, int k, int64_t, T v, bool) { dst[r][k] = v; });
}

// Loads like load_tile, rows scaled by scale[row] = 1/|row| in fp32 before the rounding to T: the
// normalised rows, within [-1, 1] whatever the norms (a zero row stays zero), as 16-bit operands.
template <typename T, int R>
__device__ __forceinline__ void load_tile_normalised(T (*dst)[kLds<T>], const T* __restrict__ src,
                                            const float* __restrict__ scale, int64_t r0, int64_t rows, int64_t k0,
                                            int64_t dim, int64_t stride, int64_t cstride, bool vec) {
  visit_tile<T, R>(src, r0, rows, k0, dim, stride, cstride, vec, [&](int r, int k, int64_t gr, T v, bool in) {
    dst[r][k] = from_float<T>(in ? to_float(v) * scale[gr] : 0.f);
  });
}

// acc tile (fp32, in smem.cs) = x[r0:r0+BM] . w[c0:c0+BN]^T over all of D.
template <typename T>
__device__ __forceinline__ void cos_tile(TileSmem<T>& sm, const T* __restrict__ x, const T* __restrict__ w, int64_t r0, int64_t c0,
                         int64_t B, int64_t C, int64_t D, int64_t sx, int64_t sxc, int64_t sw, int64_t swc, bool vec) {
  using namespace nvcuda;
  const int warp = threadIdx.x / 32;
  const int wm = (warp / 2) * 32, wn = (warp % 2) * 32;  // this warp's 32x32 quarter
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  for (int64_t k0 = 0; k0 < D; k0 += BK) {
    load_tile<T, BM>(sm.xs, x, r0, B, k0, D, sx, sxc, vec);
    load_tile<T, BN>(sm.ws, w, c0, C, k0, D, sw, swc, vec);
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
__device__ __forceinline__ void cos_tile<float>(TileSmem<float>& sm, const float* __restrict__ x, const float* __restrict__ w,
                                int64_t r0, int64_t c0, int64_t B, int64_t C, int64_t D, int64_t sx, int64_t sxc,
                                int64_t sw, int64_t swc, bool vec) {
  const int tr = (threadIdx.x / 8) * 4, tc = threadIdx.x % 8;  // 16 x 8 threads, 4 x 8 outputs each
  float acc[4][8] = {};
  for (int64_t k0 = 0; k0 < D; k0 += BK) {
    load_tile<float, BM>(sm.xs, x, r0, B, k0, D, sx, sxc, vec);
    load_tile<float, BN>(sm.ws, w, c0, C, k0, D, sw, swc, vec);
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

// Scaled, clamped (to [-bound, bound]), filtered cosine of tile entry (r, c); *keep says whether it carries
// a gradient.
__device__ __forceinline__ float tile_cos(float raw, float rx, float rw, bool has_filter, float tau, float bound,
                                          bool* keep) {
  const float c = raw * rx * rw;
  const float cc = c < -bound ? -bound : (c > bound ? bound : c);
  bool k = (c >= -bound && c <= bound);
  if (has_filter && cc > tau) {
    *keep = false;
    return 0.f;
  }
  *keep = k;
  return cc;
}

// acc[BM][ACC] (fp32, shared) += P[BM][BN] . V[BN][BK chunk] for every BK chunk of the block's columns
// [d_begin, d_end), with V rows loaded by load_v(k0) into ws. 16-bit: each warp owns a 16-row slice on
// tensor cores, the accumulator fragments loaded from and stored back to shared memory. fp32: SIMT.
template <typename T, int ACC, typename LoadV, typename PAt>
__device__ __forceinline__ void accumulate_products(TileSmem<T>& sm, float (*acc)[kLda<ACC>], PAt p_at, const OperandT<T>* p_base,
                                    int64_t d_begin, int64_t d_end, LoadV load_v, bool transpose_p) {
  for (int64_t k0 = d_begin; k0 < d_end; k0 += BK) {
    load_v(k0);
    __syncthreads();
    const int kl = static_cast<int>(k0 - d_begin);
    if constexpr (std::is_same<T, float>::value) {
      for (int e = threadIdx.x; e < BM * BK; e += kThreads) {
        const int r = e / BK, k = e % BK;
        float v = 0.f;
        for (int j = 0; j < BN; ++j) v += p_at(r, j) * sm.ws[j][k];
        acc[r][kl + k] += v;
      }
    } else {
      using namespace nvcuda;
      const int warp = threadIdx.x / 32;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> f[2];
#pragma unroll
      for (int n = 0; n < 2; ++n)
        wmma::load_matrix_sync(f[n], &acc[16 * warp][kl + 16 * n], kLda<ACC>, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < BN; kk += 16) {
#pragma unroll
        for (int n = 0; n < 2; ++n) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> v;
          wmma::load_matrix_sync(v, &sm.ws[kk][16 * n], kLds<T>);
          if (transpose_p) {  // P^T: the P tile read column-major
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a;
            wmma::load_matrix_sync(a, p_base + kk * LDG + 16 * warp, LDG);
            wmma::mma_sync(f[n], a, v, f[n]);
          } else {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
            wmma::load_matrix_sync(a, p_base + (16 * warp) * LDG + kk, LDG);
            wmma::mma_sync(f[n], a, v, f[n]);
          }
        }
      }
#pragma unroll
      for (int n = 0; n < 2; ++n)
        wmma::store_matrix_sync(&acc[16 * warp][kl + 16 * n], f[n], kLda<ACC>, wmma::mem_row_major);
    }
    __syncthreads();  // the next chunk overwrites ws
  }
}

template <typename T, int ACC>
struct FwdSmem : TileSmem<T> {
  OperandT<T> ps[BM][std::is_same<T, float>::value ? LDC : LDG];  // P: exp(z - m), 0 where no gradient passes
  float alpha[BM];
  float acc[BM][kLda<ACC>];  // O over the block's columns
};

template <typename T, int ACC>
__global__ void __launch_bounds__(kThreads, 1) margin_ce_forward_kernel(
    const T* __restrict__ x, const T* __restrict__ w, const float* __restrict__ rx, const float* __restrict__ rw,
    const int64_t* __restrict__ labels, float* m_out, float* l_out, float* o_out, int64_t B, int64_t C, int64_t D,
    int64_t sx, int64_t sxc, int64_t sw, int64_t swc, int64_t classes_per_split, float s, float tau, bool has_filter,
    float bound, bool vec) {
  constexpr int LDA = kLda<ACC>;
  MDK_DYNAMIC_SMEM(smem_raw);  // 128-byte aligned: WMMA pointers need 32
  FwdSmem<T, ACC>& sm = *reinterpret_cast<FwdSmem<T, ACC>*>(smem_raw);
  const int64_t r0 = int64_t(blockIdx.x) * BM;
  const int64_t c_begin = int64_t(blockIdx.y) * classes_per_split;
  const int64_t c_end = c_begin + classes_per_split < C ? c_begin + classes_per_split : C;
  const int64_t d_begin = int64_t(blockIdx.z) * ACC;
  const int64_t d_end = d_begin + ACC < D ? d_begin + ACC : D;
  const bool need_o = o_out != nullptr;
  const int my_row = threadIdx.x / 2, half = threadIdx.x % 2;  // two threads per row, 32 columns each
  const int64_t grow = r0 + my_row;
  const int64_t y = grow < B ? labels[grow] : -1;
  const float rxi = grow < B ? rx[grow] : 0.f;
  float m = -1e30f, l = 0.f;
  for (int e = threadIdx.x; need_o && e < BM * LDA; e += kThreads) sm.acc[e / LDA][e % LDA] = 0.f;
  for (int64_t c0 = c_begin; c0 < c_end; c0 += BN) {
    cos_tile<T>(sm, x, w, r0, c0, B, c_end, D, sx, sxc, sw, swc, vec);
    // the tile's row max, then P and the rescaled sum-exp (both threads of a row keep the same m, l)
    float tmax = -1e30f;
    for (int j = half * (BN / 2); j < (half + 1) * (BN / 2); ++j) {
      const int64_t col = c0 + j;
      bool keep;
      if (grow < B && col < c_end && col != y) tmax = fmaxf(tmax, s * tile_cos(sm.cs[my_row][j], rxi, rw[col],
                                                                              has_filter, tau, bound, &keep));
    }
    tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
    const float m_new = fmaxf(m, tmax), alpha = __expf(m - m_new);
    float lsum = 0.f;
    for (int j = half * (BN / 2); j < (half + 1) * (BN / 2); ++j) {
      const int64_t col = c0 + j;
      float p = 0.f;
      if (grow < B && col < c_end && col != y) {
        bool keep;
        const float e = __expf(s * tile_cos(sm.cs[my_row][j], rxi, rw[col], has_filter, tau, bound, &keep) - m_new);
        lsum += e;
        p = keep ? e : 0.f;
      }
      sm.ps[my_row][j] = static_cast<OperandT<T>>(from_float<OperandT<T>>(p));
    }
    lsum += __shfl_xor_sync(0xffffffffu, lsum, 1);
    l = l * alpha + lsum;
    m = m_new;
    if (half == 0) sm.alpha[my_row] = alpha;
    __syncthreads();
    if (need_o) {
      for (int e = threadIdx.x; e < BM * ACC; e += kThreads) sm.acc[e / ACC][e % ACC] *= sm.alpha[e / ACC];
      auto p_at = [&](int r, int j) { return to_float(sm.ps[r][j]); };
      auto load_v = [&](int64_t k0) {
        load_tile_normalised<T, BN>(sm.ws, w, rw, c0, c_end, k0, D, sw, swc, vec);
      };
      accumulate_products<T, ACC>(sm, sm.acc, p_at, &sm.ps[0][0], d_begin, d_end, load_v, false);
    }
    __syncthreads();  // cs and ps are overwritten by the next tile
  }
  if (half == 0 && grow < B && blockIdx.z == 0) {
    m_out[int64_t(blockIdx.y) * B + grow] = m;
    l_out[int64_t(blockIdx.y) * B + grow] = l;
  }
  if (need_o) {
    const int cols = static_cast<int>(d_end - d_begin);
    for (int e = threadIdx.x; e < BM * cols; e += kThreads) {
      const int r = e / cols, k = e % cols;
      if (r0 + r < B) o_out[(int64_t(blockIdx.y) * B + r0 + r) * D + d_begin + k] = sm.acc[r][k];
    }
  }
}

template <typename T, int ACC>
struct GradSmem : TileSmem<T> {
  OperandT<T> gs[BM][std::is_same<T, float>::value ? LDC : LDG];  // G / gscale, rows x classes
  float dot[BN];             // sum_i G_ij c_ij per class
  float acc[BN][kLda<ACC>];  // dW^ (times 1 / gscale) over the block's columns
};

template <typename T, int ACC>
__global__ void __launch_bounds__(kThreads, 1) margin_ce_center_grad_kernel(
    const T* __restrict__ x, const T* __restrict__ w, const float* __restrict__ rx, const float* __restrict__ rw,
    const int64_t* __restrict__ labels, const float* __restrict__ lse, const float* __restrict__ gr,
    const float* __restrict__ coef, const float* __restrict__ gscale_ptr, T* dw, int64_t B, int64_t C, int64_t D,
    int64_t sx, int64_t sxc, int64_t sw, int64_t swc, int64_t sdw, int64_t sdwc, float s, float tau, bool has_filter,
    float bound, bool vec) {
  constexpr int LDA = kLda<ACC>;
  MDK_DYNAMIC_SMEM(smem_raw);
  GradSmem<T, ACC>& sm = *reinterpret_cast<GradSmem<T, ACC>*>(smem_raw);
  const int64_t c0 = int64_t(blockIdx.x) * BN;  // class tiles on grid axis x (no 65535 limit)
  const int64_t d_begin = int64_t(blockIdx.y) * ACC;
  const int64_t d_end = d_begin + ACC < D ? d_begin + ACC : D;
  const float gscale = *gscale_ptr, inv_gscale = 1.f / gscale;
  __shared__ int any_weight;
  for (int e = threadIdx.x; e < BN * LDA; e += kThreads) sm.acc[e / LDA][e % LDA] = 0.f;
  for (int j = threadIdx.x; j < BN; j += kThreads) sm.dot[j] = 0.f;
  for (int64_t r0 = 0; r0 < B; r0 += BM) {
    // skip row tiles whose rows all have zero weight (ignored rows)
    if (threadIdx.x == 0) any_weight = 0;
    __syncthreads();
    if (threadIdx.x < BM && r0 + threadIdx.x < B && gr[r0 + threadIdx.x] != 0.f) any_weight = 1;
    __syncthreads();
    if (!any_weight) continue;
    cos_tile<T>(sm, x, w, r0, c0, B, C, D, sx, sxc, sw, swc, vec);
    for (int e = threadIdx.x; e < BM * BN; e += kThreads) {
      const int r = e / BN, j = e % BN;
      const int64_t grow = r0 + r, col = c0 + j;
      float g = 0.f, c = 0.f;
      if (grow < B && col < C) {
        c = sm.cs[r][j] * rx[grow] * rw[col];
        if (col == labels[grow]) {
          g = coef[grow];
        } else {
          bool keep;
          const float cc = tile_cos(sm.cs[r][j], rx[grow], rw[col], has_filter, tau, bound, &keep);
          g = keep ? s * gr[grow] * __expf(s * cc - lse[grow]) : 0.f;
        }
      }
      sm.gs[r][j] = static_cast<OperandT<T>>(from_float<OperandT<T>>(g * inv_gscale));
      sm.cs[r][j] = g * c;  // read back by this thread only, for the per-class dot below
    }
    __syncthreads();
    for (int j = threadIdx.x; j < BN; j += kThreads) {
      float v = 0.f;
      for (int r = 0; r < BM; ++r) v += sm.cs[r][j];
      sm.dot[j] += v;
    }
    auto p_at = [&](int j, int r) { return to_float(sm.gs[r][j]); };  // G^T
    auto load_v = [&](int64_t k0) { load_tile_normalised<T, BM>(sm.ws, x, rx, r0, B, k0, D, sx, sxc, vec); };
    accumulate_products<T, ACC>(sm, sm.acc, p_at, &sm.gs[0][0], d_begin, d_end, load_v, true);
  }
  __syncthreads();
  const int cols = static_cast<int>(d_end - d_begin);
  for (int e = threadIdx.x; e < BN * cols; e += kThreads) {
    const int j = e / cols, k = e % cols;
    const int64_t col = c0 + j, gk = d_begin + k;
    if (col >= C) continue;
    const float r = rw[col];
    const float proj = r >= kZeroRowRw ? 0.f : sm.dot[j] * r * r;
    dw[col * sdw + gk * sdwc] = from_float<T>(sm.acc[j][k] * gscale * r - to_float(w[col * sw + gk * swc]) * proj);
  }
}

// 16-byte tile loads need unit column strides, D and both row strides multiples of 16 / sizeof(T) elements
// and 16-byte aligned base pointers (torch's allocations are; a view at an odd offset, or pytorch-metric-
// learning's transposed (D, C) centers, take the scalar loads).
template <typename T>
bool vectorizable(const MarginArgs& a) {
  constexpr int64_t V = 16 / sizeof(T);
  const auto aligned = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; };
  return a.sxc == 1 && a.swc == 1 && a.D % V == 0 && a.sx % V == 0 && a.sw % V == 0 && aligned(a.x) && aligned(a.w);
}

// Shared memory of each layout. Every layout fits an H100 (227 KiB) and an A100 (163 KiB); the 128-column
// ones also fit the 99 KiB of sm_86, sm_89 and sm_120 (dynamic plus the center gradient's 4 static bytes).
constexpr size_t kSmemSm86 = 99 * 1024 - 64;
static_assert(sizeof(FwdSmem<float, 256>) <= 163 * 1024 && sizeof(GradSmem<float, 256>) <= 163 * 1024, "A100");
static_assert(sizeof(FwdSmem<__half, 256>) <= 163 * 1024 && sizeof(GradSmem<__half, 256>) <= 163 * 1024, "A100");
static_assert(sizeof(FwdSmem<float, 128>) <= kSmemSm86 && sizeof(GradSmem<float, 128>) <= kSmemSm86, "sm_86");
static_assert(sizeof(FwdSmem<__half, 128>) <= kSmemSm86 && sizeof(GradSmem<__half, 128>) <= kSmemSm86, "sm_86");

template <typename T, int ACC>
size_t smem_bytes(bool forward) {
  return forward ? sizeof(FwdSmem<T, ACC>) : sizeof(GradSmem<T, ACC>);
}

// The current device's opt-in limit of dynamic shared memory per block (cudaFuncSetAttribute's ceiling).
int smem_optin(int* device) {
  if (cudaGetDevice(device) != cudaSuccess) check_launch("cudaGetDevice");
  int optin = 0;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, *device) != cudaSuccess) {
    check_launch("cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  }
  return optin;
}

// The accumulator width for this device: 256 columns where that layout fits its opt-in shared memory, else
// 128; a device where neither fits is refused by name (the Python side refuses it first, from the same
// numbers: mdkernels._cuda_ext.margin_fits).
template <typename T>
int accumulator_columns_for(bool forward, int* device) {
  const size_t optin = static_cast<size_t>(smem_optin(device));
  if (smem_bytes<T, 256>(forward) <= optin) return 256;
  if (smem_bytes<T, 128>(forward) <= optin) return 128;
  throw std::runtime_error("mdkernels: the CUDA margin kernels need " + std::to_string(smem_bytes<T, 128>(forward)) +
                           " bytes of shared memory per block; this GPU allows " + std::to_string(optin) +
                           " (use backend='triton')");
}

// cudaFuncSetAttribute applies to the current device: set once per (kernel, device), thread-safe (autograd
// runs a thread per device). Setting it twice in a race is harmless; a missed device is not.
template <typename Kernel>
void allow_smem(Kernel kernel, size_t bytes, int device) {
  static std::atomic<uint64_t> done{0};  // one bit per device (64 devices), per kernel instantiation
  const uint64_t bit = uint64_t(1) << (device & 63);
  if (done.load(std::memory_order_acquire) & bit) return;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)) !=
      cudaSuccess) {
    check_launch("cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  }
  done.fetch_or(bit, std::memory_order_acq_rel);
}

template <typename T, int ACC>
void forward_launch(const MarginArgs& a, float* m_out, float* l_out, float* o_out, int64_t splits, int64_t per_split,
                    int device, cudaStream_t stream) {
  const size_t smem = sizeof(FwdSmem<T, ACC>);
  auto kernel = margin_ce_forward_kernel<T, ACC>;
  allow_smem(kernel, smem, device);
  const int64_t d_splits = o_out != nullptr ? (a.D + ACC - 1) / ACC : 1;
  const dim3 grid(static_cast<unsigned>((a.B + BM - 1) / BM), static_cast<unsigned>(splits),
                  static_cast<unsigned>(d_splits));
  MDK_LAUNCH(kernel, grid, kThreads, smem, stream)(static_cast<const T*>(a.x), static_cast<const T*>(a.w), a.rx, a.rw,
                                           a.labels, m_out, l_out, o_out, a.B, a.C, a.D, a.sx, a.sxc, a.sw, a.swc,
                                           per_split, a.s, a.tau, a.has_filter, a.bound, vectorizable<T>(a));
  check_launch("margin_ce_forward");
}

template <typename T>
void forward_impl(const MarginArgs& a, float* m_out, float* l_out, float* o_out, int64_t splits, int64_t per_split,
                  cudaStream_t stream) {
  if (a.B == 0) return;
  int device = 0;
  if (accumulator_columns_for<T>(true, &device) == 256) {
    forward_launch<T, 256>(a, m_out, l_out, o_out, splits, per_split, device, stream);
  } else {
    forward_launch<T, 128>(a, m_out, l_out, o_out, splits, per_split, device, stream);
  }
}

template <typename T, int ACC>
void center_grad_launch(const MarginArgs& a, const float* lse, const float* gr, const float* coef,
                        const float* gscale, void* dw, int64_t sdw, int64_t sdwc, int device, cudaStream_t stream) {
  const size_t smem = sizeof(GradSmem<T, ACC>);
  auto kernel = margin_ce_center_grad_kernel<T, ACC>;
  allow_smem(kernel, smem, device);
  const dim3 grid(static_cast<unsigned>((a.C + BN - 1) / BN), static_cast<unsigned>((a.D + ACC - 1) / ACC));
  MDK_LAUNCH(kernel, grid, kThreads, smem, stream)(static_cast<const T*>(a.x), static_cast<const T*>(a.w), a.rx, a.rw,
                                           a.labels, lse, gr, coef, gscale, static_cast<T*>(dw), a.B, a.C, a.D, a.sx,
                                           a.sxc, a.sw, a.swc, sdw, sdwc, a.s, a.tau, a.has_filter, a.bound,
                                           vectorizable<T>(a));
  check_launch("margin_ce_center_grad");
}

template <typename T>
void center_grad_impl(const MarginArgs& a, const float* lse, const float* gr, const float* coef, const float* gscale,
                      void* dw, int64_t sdw, int64_t sdwc, cudaStream_t stream) {
  if (a.B == 0 || a.C == 0) return;
  int device = 0;
  if (accumulator_columns_for<T>(false, &device) == 256) {
    center_grad_launch<T, 256>(a, lse, gr, coef, gscale, dw, sdw, sdwc, device, stream);
  } else {
    center_grad_launch<T, 128>(a, lse, gr, coef, gscale, dw, sdw, sdwc, device, stream);
  }
}

}  // namespace

int64_t margin_tile_classes() { return BN; }

int64_t margin_smem_bytes(DType dtype, bool forward, int accumulator_columns) {
  const bool wide = accumulator_columns == 256;
  switch (dtype) {
    case DType::kFloat32: return wide ? smem_bytes<float, 256>(forward) : smem_bytes<float, 128>(forward);
    case DType::kFloat16: return wide ? smem_bytes<__half, 256>(forward) : smem_bytes<__half, 128>(forward);
    case DType::kBFloat16:
      return wide ? smem_bytes<__nv_bfloat16, 256>(forward) : smem_bytes<__nv_bfloat16, 128>(forward);
  }
  throw std::invalid_argument("margin_smem_bytes: unsupported dtype code");
}

void margin_ce_forward(DType dtype, const MarginArgs& a, float* m_out, float* l_out, float* o_out, int64_t splits,
                       int64_t per_split, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return forward_impl<float>(a, m_out, l_out, o_out, splits, per_split, stream);
    case DType::kFloat16: return forward_impl<__half>(a, m_out, l_out, o_out, splits, per_split, stream);
    case DType::kBFloat16: return forward_impl<__nv_bfloat16>(a, m_out, l_out, o_out, splits, per_split, stream);
  }
  throw std::invalid_argument("margin_ce_forward: unsupported dtype code");
}

void margin_ce_center_grad(DType dtype, const MarginArgs& a, const float* lse, const float* gr, const float* coef,
                           const float* gscale, void* dw, int64_t dw_row_stride, int64_t dw_col_stride,
                           cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return center_grad_impl<float>(a, lse, gr, coef, gscale, dw, dw_row_stride, dw_col_stride, stream);
    case DType::kFloat16:
      return center_grad_impl<__half>(a, lse, gr, coef, gscale, dw, dw_row_stride, dw_col_stride, stream);
    case DType::kBFloat16:
      return center_grad_impl<__nv_bfloat16>(a, lse, gr, coef, gscale, dw, dw_row_stride, dw_col_stride, stream);
  }
  throw std::invalid_argument("margin_ce_center_grad: unsupported dtype code");
}

}  // namespace mdk
