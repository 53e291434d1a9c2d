// Metal kernels of the step-decay learning rate: one element a thread, the
// math from kernels/sgd_math.h (shared with the CPU loop), the launch facts
// from kernels/metal_launch.h (shared with eval_gpu).
#include <metal_stdlib>

#include "kernels/metal_launch.h"
#include "kernels/sgd_math.h"

using namespace metal;

template <typename I>
[[kernel]] void step_decay_contiguous(
    device const I* step [[buffer(mlx_fused_sgd::launch::kStepIn)]],
    device float* out [[buffer(mlx_fused_sgd::launch::kLearningRateOut)]],
    constant const mlx_fused_sgd::launch::StepDecayArgs& args
    [[buffer(mlx_fused_sgd::launch::kStepDecayArgs)]],
    uint2 gid [[thread_position_in_grid]],
    uint2 grid [[threads_per_grid]]) {
  int64_t i = int64_t(gid.x) + int64_t(grid.x) * int64_t(gid.y);
  if (i >= args.size) {
    return;
  }
  out[i] = mlx_fused_sgd::math::step_decay_lr<I>(
      step[i], I(args.step_size), args.init, args.decay_rate);
}

template <typename I>
[[kernel]] void step_decay_general(
    device const I* step [[buffer(mlx_fused_sgd::launch::kStepIn)]],
    device float* out [[buffer(mlx_fused_sgd::launch::kLearningRateOut)]],
    constant const mlx_fused_sgd::launch::StepDecayArgs& args
    [[buffer(mlx_fused_sgd::launch::kStepDecayArgs)]],
    constant const int* shape [[buffer(mlx_fused_sgd::launch::kStepShape)]],
    constant const int64_t* strides
    [[buffer(mlx_fused_sgd::launch::kStepStrides)]],
    uint2 gid [[thread_position_in_grid]],
    uint2 grid [[threads_per_grid]]) {
  int64_t i = int64_t(gid.x) + int64_t(grid.x) * int64_t(gid.y);
  if (i >= args.size) {
    return;
  }
  int64_t loc = 0;
  int64_t elem = i;
  for (int d = args.ndim - 1; d >= 0 && elem > 0; --d) {
    loc += (elem % shape[d]) * strides[d];
    elem /= shape[d];
  }
  out[i] = mlx_fused_sgd::math::step_decay_lr<I>(
      step[loc], I(args.step_size), args.init, args.decay_rate);
}

#ifndef MFS_INSTANTIATE
#define MFS_INSTANTIATE(name, func, ...)                                       \
  template [[host_name(                                                        \
      name)]] [[kernel]] decltype(func<__VA_ARGS__>) func<__VA_ARGS__>;
#endif

#define MFS_STEP_DECAY(dtype, I)                                               \
  MFS_INSTANTIATE("step_decay_contiguous_" #dtype, step_decay_contiguous, I)   \
  MFS_INSTANTIATE("step_decay_general_" #dtype, step_decay_general, I)

MFS_STEP_DECAY(int8, int8_t)
MFS_STEP_DECAY(int16, int16_t)
MFS_STEP_DECAY(int32, int32_t)
MFS_STEP_DECAY(int64, int64_t)
MFS_STEP_DECAY(uint8, uint8_t)
MFS_STEP_DECAY(uint16, uint16_t)
MFS_STEP_DECAY(uint32, uint32_t)
MFS_STEP_DECAY(uint64, uint64_t)
