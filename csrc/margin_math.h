// Shared margin math and online-logsumexp state, __host__ __device__: the same code runs in the CUDA
// kernels and in csrc/tests/test_margin_math.cpp, which CI compiles with the host compiler and checks
// against hand-derived values and against mdkernels/ops/margin.py (python_tests/test_csrc_host.py).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define MDK_HD __host__ __device__ __forceinline__
#else
#define MDK_HD inline
#endif

namespace mdk {

constexpr double kPi = 3.14159265358979323846;
constexpr double kThetaClamp = 1e-7;  // the exact derivative takes theta from c clamped to [-1+1e-7, 1-1e-7]

template <typename T>
MDK_HD T clamp_cos(T c) {
  return c < T(-1) ? T(-1) : (c > T(1) ? T(1) : c);
}

// Target logit z = s * (cos(m1*acos(c) + m2) - m3) and dz/dc for a clamped target cosine c (docs/math.md §1).
// fallback (only when m1 == 1): where c < cos(pi - m2), z = s * (c - m2*sin(m2) - m3) and dz/dc = s.
// straight_through: dz/dc = s. Otherwise dz/dc = s*m1*sin(m1*theta + m2)/sin(theta), theta from the
// clamped c.
template <typename T>
MDK_HD void margin_target(T c, T s, T m1, T m2, T m3, bool fallback, bool straight_through, T* z, T* slope) {
  const T theta = acos(c);
  T g = cos(m1 * theta + m2) - m3;
  T d;
  if (straight_through) {
    d = s;
  } else {
    const T lo = T(-1) + T(kThetaClamp), hi = T(1) - T(kThetaClamp);
    const T cd = c < lo ? lo : (c > hi ? hi : c);
    const T td = acos(cd);
    d = s * m1 * sin(m1 * td + m2) / sin(td);
  }
  if (fallback && m1 == T(1) && c < cos(T(kPi) - m2)) {
    g = c - m2 * sin(m2) - m3;
    d = s;
  }
  *z = s * g;
  *slope = d;
}

// Running max and sum of exp over a stream of logits; merge() combines two partial states (split-C).
template <typename T>
struct LseState {
  T m;  // running max (a finite "minus infinity" to start: keeps exp(m_old - m_new) free of NaN)
  T l;  // sum of exp(z - m)

  MDK_HD static LseState empty() { return {T(-1e30), T(0)}; }

  MDK_HD void push(T z) {
    if (z > m) {
      l = l * exp(m - z) + T(1);
      m = z;
    } else {
      l += exp(z - m);
    }
  }

  MDK_HD void merge(const LseState& o) {
    const T mn = m > o.m ? m : o.m;
    l = l * exp(m - mn) + o.l * exp(o.m - mn);
    m = mn;
  }

  MDK_HD T value() const { return m + log(l); }  // -inf when nothing was pushed
};

}  // namespace mdk
