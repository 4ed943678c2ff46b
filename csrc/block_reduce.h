// Block-wide sums of N floats per thread (warp shuffles, then one shared-memory pass), for row kernels.
#pragma once

namespace mdk {

// Every thread of the block ends with the block-wide sums in v. shared: [N][threads / 32].
template <int N, int kThreads>
__device__ inline void block_sum(float (&v)[N], float (*shared)[kThreads / 32]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v[i] += __shfl_xor_sync(0xffffffffu, v[i], off);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) shared[i][warp] = v[i];
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) {
    float acc = 0.f;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) acc += shared[i][w];
    v[i] = acc;
  }
}

}  // namespace mdk
