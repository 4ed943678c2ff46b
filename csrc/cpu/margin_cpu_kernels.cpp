// The chunk epilogues of mdkernels._cpu (see margin_cpu.cpp), compiled once per instruction set:
// CMakeLists.txt builds this file twice, with MDK_CPU_NS=base (the compiler's default target) and, on
// x86-64, MDK_CPU_NS=avx2 with -mavx2 -mfma; margin_cpu.cpp picks one at run time.
#if defined(__AVX2__) || defined(__SSE2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <thread>
#include <type_traits>
#include <vector>

#include "margin_cpu.h"

namespace mdk_cpu {
namespace MDK_CPU_NS {
namespace {

// exp in float, branch-free so that the loops vectorise (Cephes' polynomial, ~1 ulp); 0 below -87.3.
// NaN stays NaN (no comparison drops it).
inline float exp_f(float x) {
  const float lo = -87.3365448f, hi = 88.3762626f;
  const float xc = x < lo ? lo : (x > hi ? hi : x);
  // round to nearest with rint (one instruction with SSE4.1/AVX; a float "+ 1.5 * 2^23 - 1.5 * 2^23"
  // rounding would be folded away under -fassociative-math, which the reductions need)
  const float n = __builtin_rintf(xc * 1.44269504088896341f);
  const int32_t k = static_cast<int32_t>(n);
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.f;
  const float scale = __builtin_bit_cast(float, (k + 127) << 23);
  return x < lo ? 0.f : y * scale;
}
inline double exp_f(double x) { return std::exp(x); }

// The clamped, filtered logit of a non-target entry; *keep: whether it passes a gradient.
template <typename T, bool kFilter>
inline T entry(T zv, T rw, T s, T tau_s, bool* keep) {
  const T v = zv * rw;
  T vc = v < -s ? -s : (v > s ? s : v);
  bool k = vc == v;  // inside [-s, s]: the clamp passes a gradient
  if (kFilter) {
    const bool high = vc > tau_s;
    vc = high ? T(0) : vc;
    k = k && !high;
  }
  *keep = k;
  return vc;
}

// body(part, r0, r1) over `threads` parts of the rows, on the process's OpenMP team where there is one
// (margin_cpu.cpp), else on threads - 1 fresh threads and this one. The parts depend only on `threads`, never on
// the team the runtime gives: each team member walks parts t, t + team, ... (same inputs, same bits).
template <typename F>
void parallel_rows(int64_t rows, int threads, F body) {
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, rows / 16)));
  if (threads <= 1) {
    body(0, 0, rows);
    return;
  }
  const int64_t per = (rows + threads - 1) / threads;
  auto part = [&](int t) {
    const int64_t r0 = t * per, r1 = std::min(rows, r0 + per);
    if (r0 < r1) body(t, r0, r1);
  };
  if (const OpenMP* omp = openmp()) {
    using Part = decltype(part);
    struct Team {
      Part* run;
      int parts;
      const OpenMP* omp;
    } team{&part, threads, omp};
    omp->parallel(
        [](void* data) {
          const auto* tm = static_cast<const Team*>(data);
          const int size = std::max(1, tm->omp->num_threads());
          for (int t = tm->omp->thread_num(); t < tm->parts; t += size) (*tm->run)(t);
        },
        &team, static_cast<unsigned>(threads), 0);
    return;
  }
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(part, t);
  part(0);
  for (auto& th : pool) th.join();
}

// One row of the forward over columns [a, b) (the target excluded by the caller's ranges).
// The largest z * rw of columns [a, b). The max reduction vectorises only without NaN/inf semantics; here
// that is harmless: a NaN input turns the sum of the exp sweep (compiled with them) into NaN whatever this
// max returns. (The clamp is monotone, so clamping this max gives the max of the clamped logits.)
template <typename T>
__attribute__((optimize("finite-math-only", "no-signed-zeros"))) T raw_max(const T* z, const T* rw, int64_t a,
                                                                            int64_t b, T mx) {
  for (int64_t j = a; j < b; ++j) {
    const T v = z[j] * rw[j];
    mx = v > mx ? v : mx;
  }
  return mx;
}

// The max of the clamped, filtered logits of columns [a, b): with the filter, entries above s * tau count
// as 0, so the raw max alone does not give it.
template <typename T, bool kFilter>
inline T row_max(const T* z, const T* rw, int64_t a, int64_t b, T s, T tau_s, T mx) {
  if (!kFilter) {
    const T raw = raw_max(z, rw, a, b, T(-1e30));
    return std::max(mx, raw < -s ? -s : (raw > s ? s : raw));
  }
  for (int64_t j = a; j < b; ++j) {
    bool keep;
    const T v = entry<T, kFilter>(z[j], rw[j], s, tau_s, &keep);
    mx = v > mx ? v : mx;
  }
  return mx;
}

template <typename T, bool kFilter>
inline T row_exp(T* z, const T* rw, int64_t a, int64_t b, T s, T tau_s, T m, bool need_p) {
  T sum = T(0);
  if (need_p) {
    for (int64_t j = a; j < b; ++j) {
      bool keep;
      const T p = exp_f(entry<T, kFilter>(z[j], rw[j], s, tau_s, &keep) - m);
      sum += p;
      z[j] = keep ? p * rw[j] : T(0);
    }
  } else {
    for (int64_t j = a; j < b; ++j) {
      bool keep;
      sum += exp_f(entry<T, kFilter>(z[j], rw[j], s, tau_s, &keep) - m);
    }
  }
  return sum;
}

// Forward: per row, the chunk's max, the rescaled running (m, l), and (need_p) z := P * rw with
// P = exp(v - m_new) where a gradient passes, 0 elsewhere (the operand of O += P . W).
template <typename T, bool kFilter>
void forward_rows(T* z, const T* rw, const int64_t* tgt, int64_t B, int64_t n, T s, T tau_s, T* m, T* l, T* alpha,
                  bool need_p, int threads) {
  parallel_rows(B, threads, [&](int, int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      T* zi = z + i * n;
      const int64_t t = tgt[i] < 0 ? n : tgt[i];  // columns [0, t) and (t, n): the target is not a logit here
      T mx = row_max<T, kFilter>(zi, rw, 0, t, s, tau_s, T(-1e30));
      mx = row_max<T, kFilter>(zi, rw, t + 1, n, s, tau_s, mx);
      const T m_new = std::max(m[i], mx);
      const T a = exp_f(m[i] - m_new);
      const T sum = row_exp<T, kFilter>(zi, rw, 0, t, s, tau_s, m_new, need_p) +
                    row_exp<T, kFilter>(zi, rw, t + 1, n, s, tau_s, m_new, need_p);
      if (need_p && t < n) zi[t] = T(0);
      l[i] = l[i] * a + sum;
      m[i] = m_new;
      alpha[i] = a;
    }
  });
}

// Center gradient: z := E * rw with E = dL/dc / (gr s) (exp(v - lse) where a gradient passes, t_e at the
// target, 0 elsewhere), and dot[j] = sum_i gr_i E_ij c_ij s (the target's c is raw_t), for the
// normalisation backward of the chunk's centers.
template <typename T, bool kFilter>
inline void grad_range(T* z, const T* rw, int64_t a, int64_t b, T s, T tau_s, T lse, T g, T* acc) {
  for (int64_t j = a; j < b; ++j) {
    bool keep;
    const T v = entry<T, kFilter>(z[j], rw[j], s, tau_s, &keep);
    const T e = keep ? exp_f(v - lse) : T(0);
    acc[j] += g * e * v;
    z[j] = e * rw[j];
  }
}

template <typename T, bool kFilter>
void center_grad_rows(T* z, const T* rw, const int64_t* tgt, int64_t B, int64_t n, T s, T tau_s, const T* lse,
                      const T* gr, const T* t_e, const T* raw_t, T* dot, int threads) {
  std::vector<std::vector<T>> partial(std::max(1, threads), std::vector<T>(n, T(0)));
  parallel_rows(B, threads, [&](int th, int64_t r0, int64_t r1) {
    T* acc = partial[th].data();
    for (int64_t i = r0; i < r1; ++i) {
      T* zi = z + i * n;
      const T g = gr[i];
      if (g == T(0)) {  // an ignored row: no gradient anywhere
        std::fill(zi, zi + n, T(0));
        continue;
      }
      const int64_t t = tgt[i] < 0 ? n : tgt[i];
      grad_range<T, kFilter>(zi, rw, 0, t, s, tau_s, lse[i], g, acc);
      grad_range<T, kFilter>(zi, rw, t + 1, n, s, tau_s, lse[i], g, acc);
      if (t < n) {
        acc[t] += g * t_e[i] * s * raw_t[i];
        zi[t] = t_e[i] * rw[t];
      }
    }
  });
  for (int64_t j = 0; j < n; ++j) {
    T v = T(0);
    for (const auto& p : partial) v += p[j];
    dot[j] = v;
  }
}

// ---- cosine top-k (mdkernels.cosine_topk): a running top-k per row over gallery chunks ----------------------
// scores (Q x n) are n(q_i) . g_{c0 + j}, not yet scaled by rg_j = 1/|g_j|. vals/idx (Q x k) hold each row's best
// so far, descending (-inf / -1 where not filled). A score enters when it beats the k-th: one comparison per
// entry on the common path; among equal cosines the earlier gallery index stays ahead (deterministic).
constexpr int64_t kSweep = 64;  // scores per block whose best is checked before the block is walked

// max_j s[j] * r[j], a NaN product ignored (MAXPS returns its second operand when either is NaN). Written with
// intrinsics: without -ffinite-math-only the compiler keeps a max reduction scalar.
inline float block_max(const float* s, const float* r, int64_t n) {
  float best = -INFINITY;
  int64_t j = 0;
#if defined(__AVX2__)
  __m256 m = _mm256_set1_ps(-INFINITY);
  for (; j + 8 <= n; j += 8) m = _mm256_max_ps(_mm256_mul_ps(_mm256_loadu_ps(s + j), _mm256_loadu_ps(r + j)), m);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, m);
  for (float v : lanes) best = v > best ? v : best;
#elif defined(__SSE2__)
  __m128 m = _mm_set1_ps(-INFINITY);
  for (; j + 4 <= n; j += 4) m = _mm_max_ps(_mm_mul_ps(_mm_loadu_ps(s + j), _mm_loadu_ps(r + j)), m);
  alignas(16) float lanes[4];
  _mm_store_ps(lanes, m);
  for (float v : lanes) best = v > best ? v : best;
#endif
  for (; j < n; ++j) best = s[j] * r[j] > best ? s[j] * r[j] : best;
  return best;
}

inline double block_max(const double* s, const double* r, int64_t n) {
  double best = -INFINITY;
  for (int64_t j = 0; j < n; ++j) best = s[j] * r[j] > best ? s[j] * r[j] : best;
  return best;
}

template <typename T>
void topk_rows(const T* scores, const T* rg, int64_t c0, int64_t Q, int64_t n, int64_t k, T* vals, int64_t* idx,
               int threads) {
  parallel_rows(Q, threads, [&](int, int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const T* si = scores + i * n;
      T* v = vals + i * k;
      int64_t* x = idx + i * k;
      T worst = v[k - 1];
      for (int64_t j0 = 0; j0 < n; j0 += kSweep) {
        const int64_t j1 = std::min<int64_t>(n, j0 + kSweep);
        // a block's best first (SIMD): most blocks hold nothing that enters
        const T best = block_max(si + j0, rg + j0, j1 - j0);
        if (!(best > worst)) continue;
        for (int64_t j = j0; j < j1; ++j) {
          const T c = si[j] * rg[j];
          if (!(c > worst)) continue;  // NaN never enters
          int64_t p = k - 1;
          while (p > 0 && v[p - 1] < c) {  // after the equal ones: the earlier index first
            v[p] = v[p - 1];
            x[p] = x[p - 1];
            --p;
          }
          v[p] = c;
          x[p] = c0 + j;
          worst = v[k - 1];
        }
      }
    }
  });
}

}  // namespace

void forward_rows(bool f64, void* z, const void* rw, const int64_t* tgt, int64_t B, int64_t n, double s, double tau_s,
                  bool has_filter, void* m, void* l, void* alpha, bool need_p, int threads) {
  auto run = [&](auto tag, auto filter) {
    using T = decltype(tag);
    forward_rows<T, decltype(filter)::value>(static_cast<T*>(z), static_cast<const T*>(rw), tgt, B, n, T(s), T(tau_s),
                                             static_cast<T*>(m), static_cast<T*>(l), static_cast<T*>(alpha), need_p,
                                             threads);
  };
  if (f64) {
    has_filter ? run(double(), std::true_type()) : run(double(), std::false_type());
  } else {
    has_filter ? run(float(), std::true_type()) : run(float(), std::false_type());
  }
}

void center_grad_rows(bool f64, void* z, const void* rw, const int64_t* tgt, int64_t B, int64_t n, double s,
                      double tau_s, bool has_filter, const void* lse, const void* gr, const void* t_e,
                      const void* raw_t, void* dot, int threads) {
  auto run = [&](auto tag, auto filter) {
    using T = decltype(tag);
    center_grad_rows<T, decltype(filter)::value>(static_cast<T*>(z), static_cast<const T*>(rw), tgt, B, n, T(s),
                                                 T(tau_s), static_cast<const T*>(lse), static_cast<const T*>(gr),
                                                 static_cast<const T*>(t_e), static_cast<const T*>(raw_t),
                                                 static_cast<T*>(dot), threads);
  };
  if (f64) {
    has_filter ? run(double(), std::true_type()) : run(double(), std::false_type());
  } else {
    has_filter ? run(float(), std::true_type()) : run(float(), std::false_type());
  }
}

void topk_rows(bool f64, const void* scores, const void* rg, int64_t c0, int64_t Q, int64_t n, int64_t k, void* vals,
               int64_t* idx, int threads) {
  if (f64) {
    topk_rows<double>(static_cast<const double*>(scores), static_cast<const double*>(rg), c0, Q, n, k,
                      static_cast<double*>(vals), idx, threads);
  } else {
    topk_rows<float>(static_cast<const float*>(scores), static_cast<const float*>(rg), c0, Q, n, k,
                     static_cast<float*>(vals), idx, threads);
  }
}

}  // namespace MDK_CPU_NS
}  // namespace mdk_cpu
