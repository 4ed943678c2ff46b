// A CPU emulator for the subset of CUDA that the kernels in csrc/ use, so that CI (which has nvcc but
// no GPU) runs the very kernel source against mdkernels.reference. Force-included (g++ -include) before
// every csrc/*.cu compiled into mdkernels._cuda_emu; nothing here is used by the real CUDA build.
//
// Execution model. A launch runs its blocks one after another. Each CUDA thread of a block is a fiber
// (ucontext) on the calling OS thread; a fiber runs until it reaches __syncthreads() or a warp
// collective, and the scheduler resumes a waiting fiber only once every thread it waits for has
// arrived. What this catches, by raising a RuntimeError in Python instead of hanging or corrupting:
//   - barriers not reached by every thread of the block (divergent __syncthreads, early return before
//     one), and warp collectives not reached by every lane (a deadlock, reported with its census);
//   - missing barriers: the threads of a block run in a chosen order (forward, reverse or shuffled,
//     see set_schedule), so a read of shared memory that another thread writes without a barrier in
//     between sees the wrong value under some order; dynamic shared memory starts as NaN bytes;
//   - WMMA misuse: pointers not 32-byte aligned, a leading dimension that is not a multiple of 16 bytes;
//   - launch errors: more dynamic shared memory than the default 48 KiB without cudaFuncSetAttribute on
//     the current device (the attribute is per device), an attribute above the device's opt-in limit
//     (an H100's 227 KiB unless set_device gives another, e.g. an RTX 4090's 99 KiB), grid.y / grid.z
//     above 65535, more than 1024 threads per block.
// What it cannot catch: out-of-bounds global accesses (the buffers are host memory), the GPU memory
// model, warp-synchronous code without __syncwarp, static __shared__ variables (zero-initialised, kept
// across blocks, not counted against the limit), performance. WMMA calls are warp barriers; fragments
// keep the accumulator
// distributed over the lanes (8 elements each, like sm_80) and full copies of the A/B operands;
// the kernels never depend on the element-to-lane mapping, which is unspecified by CUDA.
#pragma once

#ifndef MDK_EMULATE
#error "cuda_emu.h is only for the CPU emulation build (-DMDK_EMULATE)"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// Execution-space qualifiers are plain C++ here; static locals stand in for __shared__ variables
// (one block runs at a time, so all of its fibers see the same object).
#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __shared__ static
#define __forceinline__ inline
#define __launch_bounds__(...)

namespace mdk_emu {

// ---- the scheduler (cuda_emu.cpp) -----------------------------------------------------------------
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
void syncthreads();
void warp_barrier();
int lane_id();
int linear_thread();
unsigned char* dynamic_smem();
void* warp_exchange_slot(int linear_thread);  // 8 bytes per thread
[[noreturn]] void fail(const std::string& what);  // inside a kernel: abort the launch with a Python error
cudaError_t func_set_attribute(const void* kernel, int attr, int value);  // per (kernel, current device)
int current_device();
int smem_optin(int device);
void set_device(int device, int smem_optin_bytes);  // the emulated current device (and its opt-in limit)
void reset_devices();
void run(const void* kernel, dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  template <typename... A>
  void operator()(A&&... args) const {
    std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);  // converted once, shared by fibers
    auto* k = kernel;
    run(reinterpret_cast<const void*>(k), grid, block, smem, [&params, k] { std::apply(k, params); });
  }
};

template <typename... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem) {
  return Launch<P...>{kernel, grid, block, smem};
}

}  // namespace mdk_emu

#define threadIdx (::mdk_emu::thread_idx())
#define blockIdx (::mdk_emu::block_idx())
#define blockDim (::mdk_emu::block_dim())
#define gridDim (::mdk_emu::grid_dim())
#define cudaFuncSetAttribute(kernel, attr, value) \
  (::mdk_emu::func_set_attribute(reinterpret_cast<const void*>(kernel), (attr), (value)))

inline void __syncthreads() { ::mdk_emu::syncthreads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { ::mdk_emu::warp_barrier(); }

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8, "emulated shuffles move at most 8 bytes");
  if (mask != 0xffffffffu) ::mdk_emu::fail("__shfl_xor_sync: the emulator supports full-warp masks only");
  if (width != 32) ::mdk_emu::fail("__shfl_xor_sync: the emulator supports width 32 only");
  const int me = ::mdk_emu::linear_thread();
  std::memcpy(::mdk_emu::warp_exchange_slot(me), &value, sizeof(T));
  ::mdk_emu::warp_barrier();  // every lane has written
  const int src = me - ::mdk_emu::lane_id() + (::mdk_emu::lane_id() ^ (lane_mask & 31));
  T out;
  std::memcpy(&out, ::mdk_emu::warp_exchange_slot(src), sizeof(T));
  ::mdk_emu::warp_barrier();  // every lane has read before a later shuffle overwrites
  return out;
}

// One fiber runs at a time: read-modify-write is atomic by construction.
template <typename T>
inline T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}

inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }

// ---- WMMA (mma.h) ---------------------------------------------------------------------------------
namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {
// Every WMMA operation is warp-collective: all 32 lanes must reach it (a divergent call deadlocks here,
// as it is undefined on the GPU).
inline void check_pointer(const void* p, unsigned ldm, size_t elem, const char* what) {
  ::mdk_emu::warp_barrier();
  if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0)
    ::mdk_emu::fail(std::string(what) + ": pointer is not 32-byte aligned (WMMA requires 256-bit alignment)");
  if ((ldm * elem) % 16 != 0)
    ::mdk_emu::fail(std::string(what) + ": ldm must be a multiple of 16 bytes (8 halves / 4 floats)");
}
template <typename T>
inline float as_float(T v) {
  return static_cast<float>(v);
}
template <>
inline float as_float<__half>(__half v) {
  return __half2float(v);
}
template <>
inline float as_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment;

// A and B operands (Use = matrix_a or matrix_b): every lane keeps the whole 16x16 tile (row r, col c at
// [r * 16 + c] in logical A (M x K) or B (K x N) coordinates, whatever the memory layout).
template <typename Use, typename T, typename Layout>
struct fragment<Use, 16, 16, 16, T, Layout> {
  static_assert(std::is_same<Use, matrix_a>::value || std::is_same<Use, matrix_b>::value, "operand fragment");
  static constexpr int num_elements = 256;
  T x[256];
};
// Accumulator: lane l owns logical entries [8 l, 8 l + 8) of the row-major 16x16 tile.
template <>
struct fragment<accumulator, 16, 16, 16, float, void> {
  static constexpr int num_elements = 8;
  float x[8];
};

template <typename Frag>
inline void fill_fragment(Frag& f, float v) {
  for (int i = 0; i < Frag::num_elements; ++i) f.x[i] = v;
}

template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* p, unsigned ldm) {
  constexpr bool col = std::is_same<Layout, col_major>::value;
  detail::check_pointer(p, ldm, sizeof(T), "wmma::load_matrix_sync(operand)");
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = col ? p[c * ldm + r] : p[r * ldm + c];
}
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm,
                             layout_t layout) {
  detail::check_pointer(p, ldm, sizeof(float), "wmma::load_matrix_sync(accumulator)");
  const int base = 8 * ::mdk_emu::lane_id();
  for (int i = 0; i < 8; ++i) {
    const int r = (base + i) / 16, c = (base + i) % 16;
    f.x[i] = layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
  }
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  detail::check_pointer(p, ldm, sizeof(float), "wmma::store_matrix_sync");
  const int base = 8 * ::mdk_emu::lane_id();
  for (int i = 0; i < 8; ++i) {
    const int r = (base + i) / 16, c = (base + i) % 16;
    (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[i];
  }
}

// d = a . b + c with products and sums in fp32 (tensor cores accumulate in fp32 too, in another order).
template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  ::mdk_emu::warp_barrier();
  const int base = 8 * ::mdk_emu::lane_id();
  float out[8];
  for (int i = 0; i < 8; ++i) {
    const int r = (base + i) / 16, col = (base + i) % 16;
    float acc = c.x[i];
    for (int k = 0; k < 16; ++k) acc += detail::as_float(a.x[r * 16 + k]) * detail::as_float(b.x[k * 16 + col]);
    out[i] = acc;
  }
  for (int i = 0; i < 8; ++i) d.x[i] = out[i];
}

}  // namespace wmma
}  // namespace nvcuda
