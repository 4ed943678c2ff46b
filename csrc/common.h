// Shared helpers for the mdkernels CUDA module: dtype codes, conversions, error checks.
// No torch headers: tensors arrive as raw device pointers plus a dtype code and the current stream.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

// Kernel launches and dynamic shared memory through macros, so that the same source also compiles into
// the CPU emulator (csrc/emu/cuda_emu.h, built as mdkernels._cuda_emu for CI, which has no GPU).
#ifdef MDK_EMULATE
#define MDK_LAUNCH(kernel, grid, block, smem, stream) ::mdk_emu::launch(kernel, grid, block, smem)
#define MDK_DYNAMIC_SMEM(name) unsigned char* name = ::mdk_emu::dynamic_smem()
#else
#define MDK_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#define MDK_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

namespace mdk {

// Must match mdkernels/_cuda_ext.py::_DTYPE_CODES.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

__host__ __device__ inline float to_float(float v) { return v; }
__device__ inline float to_float(__half v) { return __half2float(v); }
__device__ inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ inline T from_float(float v);
template <> __device__ inline float from_float<float>(float v) { return v; }
template <> __device__ inline __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

inline void check_launch(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("mdkernels CUDA kernel ") + what + " failed to launch: " +
                             cudaGetErrorString(err));
  }
}

inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace mdk
