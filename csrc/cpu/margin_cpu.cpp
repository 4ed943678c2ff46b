// mdkernels._cpu: the CPU path's chunk epilogues of the fused margin ops and of the cosine top-k, in C++ (host
// compiler only, no torch headers). Each replaces about eight elementwise torch passes over a (B, n) chunk of logits with
// one read and one write per element, the row kept in L1 between its two sweeps. Rows are split over
// threads. The Python side (mdkernels/ops/_common/chunked.py) keeps the pure-torch passes as the fallback
// and as the reference these are tested against.
//
// A chunk z (B x n, row-major) holds s * n(x_i) . w_j, not yet scaled by rw_j = 1/|w_j|. tgt[i] is the
// target's column in the chunk, or -1. For every other entry: v = z * rw, the clamp to [-s, s] (no
// gradient outside), insightface's filter (0 where v > s * tau, no gradient).
//
// The kernels are compiled for the default target and, on x86-64, for AVX2 + FMA (8-wide exp); the
// AVX2 build runs where the CPU has both (checked once at import; MDK_CPU_ISA=base forces the other).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "margin_cpu.h"

namespace py = pybind11;

namespace {

bool use_avx2() {
#if defined(MDK_CPU_HAVE_AVX2)
  // MDK_CPU_ISA=base forces the default-target build (tests run it on AVX2 machines too)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         std::string(std::getenv("MDK_CPU_ISA") ? std::getenv("MDK_CPU_ISA") : "") != "base";
  return ok;
#else
  return false;
#endif
}

template <typename P>
P* ptr(std::uintptr_t p) {
  return reinterpret_cast<P*>(p);
}

}  // namespace

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "mdkernels CPU epilogues of the chunked margin ops (raw pointers; see mdkernels/ops/_common/chunked.py)";
  m.attr("isa") = std::string(use_avx2() ? "avx2" : "base");
  m.def(
      "forward_rows",
      [](bool f64, std::uintptr_t z, std::uintptr_t rw, std::uintptr_t tgt, int64_t B, int64_t n, double s,
         double tau_s, bool has_filter, std::uintptr_t mx, std::uintptr_t l, std::uintptr_t alpha, bool need_p,
         int threads) {
        auto fn = mdk_cpu::base::forward_rows;
#if defined(MDK_CPU_HAVE_AVX2)
        if (use_avx2()) fn = mdk_cpu::avx2::forward_rows;
#endif
        fn(f64, ptr<void>(z), ptr<const void>(rw), ptr<const int64_t>(tgt), B, n, s, tau_s, has_filter, ptr<void>(mx),
           ptr<void>(l), ptr<void>(alpha), need_p, threads);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "center_grad_rows",
      [](bool f64, std::uintptr_t z, std::uintptr_t rw, std::uintptr_t tgt, int64_t B, int64_t n, double s,
         double tau_s, bool has_filter, std::uintptr_t lse, std::uintptr_t gr, std::uintptr_t t_e,
         std::uintptr_t raw_t, std::uintptr_t dot, int threads) {
        auto fn = mdk_cpu::base::center_grad_rows;
#if defined(MDK_CPU_HAVE_AVX2)
        if (use_avx2()) fn = mdk_cpu::avx2::center_grad_rows;
#endif
        fn(f64, ptr<void>(z), ptr<const void>(rw), ptr<const int64_t>(tgt), B, n, s, tau_s, has_filter,
           ptr<const void>(lse), ptr<const void>(gr), ptr<const void>(t_e), ptr<const void>(raw_t), ptr<void>(dot),
           threads);
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "topk_rows",
      [](bool f64, std::uintptr_t scores, std::uintptr_t rg, int64_t c0, int64_t Q, int64_t n, int64_t k,
         std::uintptr_t vals, std::uintptr_t idx, int threads) {
        auto fn = mdk_cpu::base::topk_rows;
#if defined(MDK_CPU_HAVE_AVX2)
        if (use_avx2()) fn = mdk_cpu::avx2::topk_rows;
#endif
        fn(f64, ptr<const void>(scores), ptr<const void>(rg), c0, Q, n, k, ptr<void>(vals), ptr<int64_t>(idx),
           threads);
      },
      py::call_guard<py::gil_scoped_release>());
}
