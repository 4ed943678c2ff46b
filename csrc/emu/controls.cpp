// Schedule control and self-test kernels of the CPU emulator: each self-test is a small kernel with
// a known defect (or none), so the Python tests can show that the emulator's checks fire.
#include <mma.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "../common.h"
#include "emu_control.h"

#include <pybind11/stl.h>

namespace mdk_emu {
namespace {

constexpr int kN = 128;

// out[i] = in[(i + 1) % n] through shared memory; with_sync=false omits the barrier between the
// write and the read (a race the schedules expose).
__global__ void rotate_kernel(const float* in, float* out, bool with_sync) {
  MDK_DYNAMIC_SMEM(raw);
  float* sh = reinterpret_cast<float*>(raw);
  const int i = threadIdx.x;
  sh[i] = in[i];
  if (with_sync) __syncthreads();
  out[i] = sh[(i + 1) % kN];
}

// A warp sum by shuffles, written by lane 0 of each warp.
__global__ void warp_sum_kernel(const float* in, float* out) {
  float v = in[threadIdx.x];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if (threadIdx.x % 32 == 0) out[threadIdx.x / 32] = v;
}

// Reads one element past the end of its input: only the AddressSanitizer build sees it.
__global__ void out_of_bounds_kernel(const float* in, float* out) { out[threadIdx.x] = in[threadIdx.x + 1]; }

__global__ void divergent_sync_kernel(float* out) {
  if (threadIdx.x < 64) __syncthreads();
  out[threadIdx.x] = 1.f;
}

__global__ void early_return_kernel(float* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1.f;
}

__global__ void divergent_shuffle_kernel(float* out) {
  float v = 1.f;
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  __syncthreads();
  out[threadIdx.x] = v;
}

__global__ void misaligned_wmma_kernel(float* out) {
  MDK_DYNAMIC_SMEM(raw);
  __half* sh = reinterpret_cast<__half*>(raw);
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> a;
  nvcuda::wmma::load_matrix_sync(a, sh + 4, 24);  // 8 bytes off a 32-byte boundary
  out[threadIdx.x] = 0.f;
}

// WMMA in lane-divergent code: undefined on the GPU, a deadlock report here.
__global__ void divergent_wmma_kernel(float* out) {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc;
  if (threadIdx.x < 16) nvcuda::wmma::fill_fragment(acc, 0.f);
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> a;
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, __half, nvcuda::wmma::col_major> b;
  if (threadIdx.x < 16) nvcuda::wmma::mma_sync(acc, a, b, acc);
  out[threadIdx.x] = 0.f;
}

// 16x16 fp16 matmul through the WMMA emulation: out = A . B (A row-major, B col-major, fp32 out).
__global__ void wmma_matmul_kernel(const __half* a, const __half* b, float* out) {
  using namespace nvcuda;
  MDK_DYNAMIC_SMEM(raw);
  __half* sa = reinterpret_cast<__half*>(raw);
  __half* sb = sa + 256;
  for (int e = threadIdx.x; e < 256; e += 32) {
    sa[e] = a[e];
    sb[e] = b[e];
  }
  __syncthreads();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.f);
  wmma::load_matrix_sync(fa, sa, 16);
  wmma::load_matrix_sync(fb, sb, 16);
  wmma::mma_sync(acc, fa, fb, acc);
  float* sc = reinterpret_cast<float*>(sb + 256);  // 1024 bytes in: 32-byte aligned
  wmma::store_matrix_sync(sc, acc, 16, wmma::mem_row_major);
  __syncthreads();
  for (int e = threadIdx.x; e < 256; e += 32) out[e] = sc[e];
}

std::vector<float> selftest(const std::string& name) {
  std::vector<float> in(kN), out(kN, -1.f);
  for (int i = 0; i < kN; ++i) in[i] = static_cast<float>(i);
  if (name == "rotate" || name == "rotate_without_sync") {
    MDK_LAUNCH(rotate_kernel, 1, kN, kN * sizeof(float), 0)(in.data(), out.data(), name == "rotate");
  } else if (name == "warp_sum") {
    out.assign(kN / 32, 0.f);
    MDK_LAUNCH(warp_sum_kernel, 1, kN, 0, 0)(in.data(), out.data());
  } else if (name == "out_of_bounds") {
    std::vector<float> small(kN);  // exactly kN elements: thread kN - 1 reads small[kN]
    MDK_LAUNCH(out_of_bounds_kernel, 1, kN, 0, 0)(small.data(), out.data());
  } else if (name == "divergent_sync") {
    MDK_LAUNCH(divergent_sync_kernel, 1, kN, 0, 0)(out.data());
  } else if (name == "early_return") {
    MDK_LAUNCH(early_return_kernel, 1, kN, 0, 0)(out.data());
  } else if (name == "divergent_shuffle") {
    MDK_LAUNCH(divergent_shuffle_kernel, 1, kN, 0, 0)(out.data());
  } else if (name == "misaligned_wmma") {
    MDK_LAUNCH(misaligned_wmma_kernel, 1, 32, 1024, 0)(out.data());
  } else if (name == "divergent_wmma") {
    MDK_LAUNCH(divergent_wmma_kernel, 1, 32, 0, 0)(out.data());
  } else if (name == "too_much_smem") {
    MDK_LAUNCH(rotate_kernel, 1, kN, 64 * 1024, 0)(in.data(), out.data(), true);
  } else if (name == "grid_y_too_large") {
    MDK_LAUNCH(warp_sum_kernel, dim3(1, 70000), kN, 0, 0)(in.data(), out.data());
  } else if (name == "wmma_matmul") {
    std::vector<__half> a(256), b(256);
    for (int i = 0; i < 256; ++i) {
      a[i] = __float2half_rn(static_cast<float>((i * 7) % 11 - 5));  // small integers: exact in fp16
      b[i] = __float2half_rn(static_cast<float>((i * 5) % 7 - 3));
    }
    out.assign(256, 0.f);
    MDK_LAUNCH(wmma_matmul_kernel, 1, 32, 2048, 0)(a.data(), b.data(), out.data());
  } else {
    throw std::invalid_argument("unknown emulator self-test " + name);
  }
  return out;
}

}  // namespace

void bind_controls(pybind11::module_& m) {
  m.attr("emulated") = true;
  m.def(
      "set_schedule",
      [](const std::string& order, uint64_t seed) {
        if (order == "forward") return set_schedule(Schedule::kForward, seed);
        if (order == "reverse") return set_schedule(Schedule::kReverse, seed);
        if (order == "shuffle") return set_schedule(Schedule::kShuffle, seed);
        throw std::invalid_argument("schedule must be 'forward', 'reverse' or 'shuffle', got " + order);
      },
      pybind11::arg("order"), pybind11::arg("seed") = 0,
      "Order in which the threads of a block run between barriers (shuffle: a new order per block)");
  m.def("selftest", &selftest, pybind11::arg("name"), "Run one of the emulator's self-test kernels");
  m.def("set_device", &set_device, pybind11::arg("device"), pybind11::arg("smem_optin") = 0,
        "Make `device` the emulated current device; smem_optin > 0 sets its opt-in shared memory per block");
  m.def("reset_devices", &reset_devices, "Device 0 current, every opt-in limit back to an H100's (attributes already set stay)");
}

}  // namespace mdk_emu
