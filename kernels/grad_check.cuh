// CUDA kernels that read the gradients before an update: the non-finite check
// (skip_nonfinite) and the squared norm (max_grad_norm). Multi-tensor over
// the gradients whose elements are one dense block (a transposed gradient is
// one too: a sum and an OR do not care about the order), one tensor a launch
// otherwise (sliced or broadcast). Each block reduces its threads' values
// with warp shuffles, then across its warps in shared memory. The check's
// blocks OR a flag; the norm's write their sums to slots of their own, which
// sum_partials adds up in a fixed order, so that the norm has the same bits
// on every run (data-parallel ranks clipping by it stay in step). The test is
// math::is_nonfinite from kernels/sgd_math.h, shared with the CPU loop and
// the Metal kernels.
#pragma once

#include "kernels/cuda_launch.h"
#include "kernels/sgd_math.h"

namespace mlx_fused_sgd {
namespace cuda_kernels {

// Clears a check's flag before the blocks OR into it.
__global__ void clear_result(void* result) {
  *static_cast<uint32_t*>(result) = 0u;
}

// Reads a thread makes per chunk of cuda_launch::kChunk elements.
inline constexpr int kReadsPerThread =
    static_cast<int>(cuda_launch::kChunk / cuda_launch::kThreads);

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = cuda_launch::kWarpSize / 2; offset > 0; offset /= 2) {
    x = x + __shfl_down_sync(0xffffffffu, x, offset);
  }
  return x;
}

// The block's sum of `x`, valid in thread 0. Every thread of the block calls
// it (none returns early: the barrier waits for all of them).
__device__ __forceinline__ float block_sum(float x) {
  constexpr int kWarps = cuda_launch::kThreads / cuda_launch::kWarpSize;
  __shared__ float partials[kWarps];
  const int lane = threadIdx.x % cuda_launch::kWarpSize;
  const int warp = threadIdx.x / cuda_launch::kWarpSize;
  x = warp_sum(x);
  if (lane == 0) {
    partials[warp] = x;
  }
  __syncthreads();
  float total = 0.0f;
  if (warp == 0) {
    total = warp_sum(lane < kWarps ? partials[lane] : 0.0f);
  }
  return total;
}

// What one gradient element adds: 1 if it is NaN or Inf (the check), its
// square (the norm), in float32.
template <bool kNorm> __device__ __forceinline__ float read_value(float x) {
  if (kNorm) {
    return x * x;
  }
  return math::is_nonfinite(x) ? 1.0f : 0.0f;
}

// The block's total into the result. The check's result is a uint32 flag
// OR-ed with 1 by any block that saw a NaN or an Inf (a count of non-finite
// elements summed as floats is exact far beyond a block). The norm's is a
// float32 a block, written to the block's own slot (every block writes its
// slot, zero included: the slots are not cleared).
template <bool kNorm>
__device__ __forceinline__ void
add_block(float local, void* result, int64_t slot) {
  const float total = block_sum(local);
  if (threadIdx.x != 0) {
    return;
  }
  if (kNorm) {
    static_cast<float*>(result)[slot] = total;
  } else if (total != 0.0f) {
    atomicOr(static_cast<unsigned int*>(result), 1u);
  }
}

// The norm: the blocks' sums added up by one block in a fixed order (thread
// t takes slots t, t + kThreads, ... in turn, then the block reduces), the
// same whatever order the blocks ran in.
__global__ void sum_partials(const float* partials, int64_t count, float* sum) {
  float local = 0.0f;
  for (int64_t i = threadIdx.x; i < count; i += cuda_launch::kThreads) {
    local = local + partials[i];
  }
  const float total = block_sum(local);
  if (threadIdx.x == 0) {
    *sum = total;
  }
}

// `result`: the check's flag, or the norm's slots, of which this launch's
// blocks take those from `first_slot` on.
template <typename T, bool kNorm>
__global__ void grad_read_multi_tensor(
    const __grid_constant__ cuda_launch::ReadTable table,
    void* result,
    int64_t first_slot) {
  const int64_t block = blockIdx.x;
  const int t = launch::span_tensor(table.block_end, table.count, block);
  const int64_t first = t == 0 ? 0 : table.block_end[t - 1];
  const int64_t begin = (block - first) * cuda_launch::kChunk;
  const int64_t size = table.size[t];
  const T* x = static_cast<const T*>(table.data[t]);
  float local = 0.0f;
  for (int k = 0; k < kReadsPerThread; ++k) {
    const int64_t i =
        begin + int64_t(k) * cuda_launch::kThreads + int64_t(threadIdx.x);
    if (i < size) {
      local = local + read_value<kNorm>(static_cast<float>(x[i]));
    }
  }
  add_block<kNorm>(local, result, first_slot + int64_t(blockIdx.x));
}

// The element at row-major index i of a strided gradient.
__device__ __forceinline__ int64_t
strided_offset(int64_t i, const cuda_launch::ReadShape& s) {
  int64_t loc = 0;
  for (int d = s.ndim - 1; d >= 0 && i > 0; --d) {
    loc += (i % s.shape[d]) * s.strides[d];
    i /= s.shape[d];
  }
  return loc;
}

template <typename T, bool kNorm>
__global__ void grad_read_strided(
    const T* x,
    int64_t size,
    const __grid_constant__ cuda_launch::ReadShape shape,
    void* result,
    int64_t first_slot) {
  const int64_t begin = int64_t(blockIdx.x) * cuda_launch::kChunk;
  float local = 0.0f;
  for (int k = 0; k < kReadsPerThread; ++k) {
    const int64_t i =
        begin + int64_t(k) * cuda_launch::kThreads + int64_t(threadIdx.x);
    if (i < size) {
      local = local + read_value<kNorm>(
                          static_cast<float>(x[strided_offset(i, shape)]));
    }
  }
  add_block<kNorm>(local, result, first_slot + int64_t(blockIdx.x));
}

} // namespace cuda_kernels
} // namespace mlx_fused_sgd
