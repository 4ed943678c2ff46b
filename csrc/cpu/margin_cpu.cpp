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
//
// Rows run on the threads of the OpenMP runtime torch already loaded (libgomp in torch's wheels; Intel's and
// LLVM's runtimes export the same GOMP_parallel entry point), found at import through the loader's list of
// loaded objects: after a GEMM its threads still spin, waiting for work, so fresh std::threads would share the
// cores with them (measured: a 2-core sweep slower than a 1-core one). MDK_CPU_THREADS=std forces std::thread.
#include <pybind11/pybind11.h>
#if defined(__has_include)
#if __has_include(<link.h>) && __has_include(<dlfcn.h>)  // ELF systems (Linux); elsewhere std::thread only
#define MDK_CPU_FIND_OPENMP 1
#include <dlfcn.h>
#include <link.h>
#endif
#endif

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "margin_cpu.h"

namespace py = pybind11;

namespace {

const char* env(const char* name) { return std::getenv(name) ? std::getenv(name) : ""; }

bool use_avx2() {
#if defined(MDK_CPU_HAVE_AVX2)
  // MDK_CPU_ISA=base forces the default-target build (tests run it on AVX2 machines too)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         std::string(env("MDK_CPU_ISA")) != "base";
  return ok;
#else
  return false;
#endif
}

#if defined(MDK_CPU_FIND_OPENMP)
// The path of the loaded OpenMP runtime: one under torch's lib/ first, else the first loaded.
std::string loaded_openmp() {
  std::pair<std::string, std::string> found;  // (under torch, any)
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* data) -> int {
        auto* f = static_cast<std::pair<std::string, std::string>*>(data);
        const char* name = info->dlpi_name ? info->dlpi_name : "";
        const char* slash = std::strrchr(name, '/');
        const char* base = slash ? slash + 1 : name;
        if (std::strncmp(base, "libgomp", 7) != 0 && std::strncmp(base, "libiomp5", 8) != 0 &&
            std::strncmp(base, "libomp", 6) != 0)
          return 0;
        if (f->second.empty()) f->second = name;
        if (f->first.empty() && std::strstr(name, "/torch/lib/")) f->first = name;
        return 0;
      },
      &found);
  return found.first.empty() ? found.second : found.first;
}

#endif

std::string openmp_path;  // what import found ("" where none, or MDK_CPU_THREADS=std)

const mdk_cpu::OpenMP* find_openmp() {
  if (std::string(env("MDK_CPU_THREADS")) == "std") return nullptr;
#if !defined(MDK_CPU_FIND_OPENMP)
  return nullptr;
#else
  static mdk_cpu::OpenMP o{};
  const std::string path = loaded_openmp();
  if (path.empty()) return nullptr;
  void* h = dlopen(path.c_str(), RTLD_LAZY | RTLD_NOLOAD);  // already loaded: no new copy, a handle to it
  if (!h) return nullptr;
  o.parallel = reinterpret_cast<decltype(o.parallel)>(dlsym(h, "GOMP_parallel"));
  o.thread_num = reinterpret_cast<decltype(o.thread_num)>(dlsym(h, "omp_get_thread_num"));
  o.num_threads = reinterpret_cast<decltype(o.num_threads)>(dlsym(h, "omp_get_num_threads"));
  if (!o.parallel || !o.thread_num || !o.num_threads) return nullptr;
  openmp_path = path;
  return &o;
#endif
}

const mdk_cpu::OpenMP* the_openmp = nullptr;

template <typename P>
P* ptr(std::uintptr_t p) {
  return reinterpret_cast<P*>(p);
}

}  // namespace

const mdk_cpu::OpenMP* mdk_cpu::openmp() { return the_openmp; }

PYBIND11_MODULE(_cpu, m) {
  m.doc() = "mdkernels CPU epilogues of the chunked margin ops (raw pointers; see mdkernels/ops/_common/chunked.py)";
  m.attr("isa") = std::string(use_avx2() ? "avx2" : "base");
  the_openmp = find_openmp();  // torch is imported first (chunked.py): its runtime is loaded by now
  m.attr("threads") = the_openmp ? "openmp " + openmp_path : std::string("std::thread");
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
