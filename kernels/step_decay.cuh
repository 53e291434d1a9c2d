// CUDA kernel of the step-decay learning rate: one element a thread, the math
// from kernels/sgd_math.h (shared with the CPU loop and the Metal kernels).
#pragma once

#include "kernels/cuda_launch.h"
#include "kernels/sgd_math.h"

namespace mlx_fused_sgd {
namespace cuda_kernels {

// `shape.ndim` 0: a row-contiguous step array; otherwise its shape and
// strides.
template <typename I>
__global__ void step_decay(
    const I* step,
    float* out,
    const __grid_constant__ launch::StepDecayArgs args,
    const __grid_constant__ cuda_launch::ReadShape shape) {
  const int64_t i = int64_t(blockIdx.x) * cuda_launch::kThreads + threadIdx.x;
  if (i >= args.size) {
    return;
  }
  int64_t loc = i;
  if (shape.ndim > 0) {
    loc = 0;
    int64_t elem = i;
    for (int d = shape.ndim - 1; d >= 0 && elem > 0; --d) {
      loc += (elem % shape.shape[d]) * shape.strides[d];
      elem /= shape.shape[d];
    }
  }
  out[i] = math::step_decay_lr<I>(
      step[loc], I(args.step_size), args.init, args.decay_rate);
}

} // namespace cuda_kernels
} // namespace mlx_fused_sgd
