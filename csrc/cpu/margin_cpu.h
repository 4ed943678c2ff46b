// Entry points of the CPU chunk epilogues, one set per instruction set (margin_cpu_kernels.cpp).
#pragma once

#include <cstdint>

namespace mdk_cpu {

#define MDK_CPU_DECLARE(ns)                                                                                    \
  namespace ns {                                                                                               \
  void forward_rows(bool f64, void* z, const void* rw, const int64_t* tgt, int64_t B, int64_t n, double s,     \
                    double tau_s, bool has_filter, void* m, void* l, void* alpha, bool need_p, int threads);   \
  void center_grad_rows(bool f64, void* z, const void* rw, const int64_t* tgt, int64_t B, int64_t n, double s, \
                        double tau_s, bool has_filter, const void* lse, const void* gr, const void* t_e,       \
                        const void* raw_t, void* dot, int threads);                                            \
  void topk_rows(bool f64, const void* scores, const void* rg, int64_t c0, int64_t Q, int64_t n, int64_t k,    \
                 void* vals, int64_t* idx, int threads);                                                       \
  }

MDK_CPU_DECLARE(base)
#if defined(MDK_CPU_HAVE_AVX2)
MDK_CPU_DECLARE(avx2)
#endif

}  // namespace mdk_cpu
