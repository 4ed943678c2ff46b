// Entry points of the CPU chunk epilogues, one set per instruction set (margin_cpu_kernels.cpp).
#pragma once

#include <cstdint>

namespace mdk_cpu {

// The team runner of the OpenMP runtime already in the process (the one torch's CPU operations run on), found
// at import (margin_cpu.cpp): the sweeps between two GEMMs run on the GEMMs' own threads, which are still spinning
// when a sweep starts, instead of on fresh threads that would compete with them for the cores. Null where no
// OpenMP runtime is loaded (the sweeps then use std::thread).
struct OpenMP {
  void (*parallel)(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags);  // GOMP_parallel
  int (*thread_num)();                                                                    // omp_get_thread_num
  int (*num_threads)();                                                                   // omp_get_num_threads
};
const OpenMP* openmp();

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
