// Metal kernels that read the gradients before the update: the non-finite
// check (skip_nonfinite) and the squared norm (max_grad_norm).
//
// The non-finite check: one
// uint32 flag per chunk of tensors, cleared by grad_check_clear and OR-ed
// with 1 by any thread that sees a NaN or an Inf. The test is
// mlx_fused_sgd::math::is_nonfinite from kernels/sgd_math.h, shared with the
// CPU loop; the launch facts are kernels/sgd_launch.h, shared with eval_gpu.
#include <metal_stdlib>

#include "kernels/sgd_launch.h"
#include "kernels/sgd_math.h"

using namespace metal;

[[kernel]] void grad_check_clear(
    device atomic_uint* flag [[buffer(mlx_fused_sgd::launch::kCheckFlag)]],
    uint gid [[thread_position_in_grid]]) {
  if (gid == 0) {
    atomic_store_explicit(flag, 0u, memory_order_relaxed);
  }
}

template <typename T>
[[kernel]] void grad_check_contiguous(
    device const T* x [[buffer(mlx_fused_sgd::launch::kCheckIn)]],
    device atomic_uint* flag [[buffer(mlx_fused_sgd::launch::kCheckFlag)]],
    constant const mlx_fused_sgd::launch::CheckArgs& args
    [[buffer(mlx_fused_sgd::launch::kCheckArgs)]],
    uint2 gid [[thread_position_in_grid]],
    uint2 grid [[threads_per_grid]]) {
  int64_t begin = (int64_t(gid.x) + int64_t(grid.x) * int64_t(gid.y)) *
                  mlx_fused_sgd::launch::kWorkPerThread;
  if (begin >= args.size) {
    return;
  }
  int64_t end = begin + mlx_fused_sgd::launch::kWorkPerThread;
  end = end < args.size ? end : args.size;
  bool bad = false;
  for (int64_t i = begin; i < end; ++i) {
    bad = bad || mlx_fused_sgd::math::is_nonfinite(static_cast<float>(x[i]));
  }
  if (bad) {
    atomic_fetch_or_explicit(flag, 1u, memory_order_relaxed);
  }
}

template <typename T>
[[kernel]] void grad_check_general(
    device const T* x [[buffer(mlx_fused_sgd::launch::kCheckIn)]],
    device atomic_uint* flag [[buffer(mlx_fused_sgd::launch::kCheckFlag)]],
    constant const mlx_fused_sgd::launch::CheckArgs& args
    [[buffer(mlx_fused_sgd::launch::kCheckArgs)]],
    constant const int* shape [[buffer(mlx_fused_sgd::launch::kCheckShape)]],
    constant const int64_t* strides
    [[buffer(mlx_fused_sgd::launch::kCheckStrides)]],
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
  if (mlx_fused_sgd::math::is_nonfinite(static_cast<float>(x[loc]))) {
    atomic_fetch_or_explicit(flag, 1u, memory_order_relaxed);
  }
}

// The squared L2 norm of a chunk (max_grad_norm): each thread adds the sum
// of its elements' squares, in float32, to one float (the order of the adds
// varies from run to run on a GPU; see the README on clipping).
[[kernel]] void grad_norm_clear(
    device atomic_float* sum [[buffer(mlx_fused_sgd::launch::kNormSum)]],
    uint gid [[thread_position_in_grid]]) {
  if (gid == 0) {
    atomic_store_explicit(sum, 0.0f, memory_order_relaxed);
  }
}

template <typename T>
[[kernel]] void grad_norm_contiguous(
    device const T* x [[buffer(mlx_fused_sgd::launch::kNormIn)]],
    device atomic_float* sum [[buffer(mlx_fused_sgd::launch::kNormSum)]],
    constant const mlx_fused_sgd::launch::CheckArgs& args
    [[buffer(mlx_fused_sgd::launch::kNormArgs)]],
    uint2 gid [[thread_position_in_grid]],
    uint2 grid [[threads_per_grid]]) {
  int64_t begin = (int64_t(gid.x) + int64_t(grid.x) * int64_t(gid.y)) *
                  mlx_fused_sgd::launch::kWorkPerThread;
  if (begin >= args.size) {
    return;
  }
  int64_t end = begin + mlx_fused_sgd::launch::kWorkPerThread;
  end = end < args.size ? end : args.size;
  float local = 0.0f;
  for (int64_t i = begin; i < end; ++i) {
    float v = static_cast<float>(x[i]);
    float sq = v * v;
    local = local + sq;
  }
  if (local != 0.0f) {
    atomic_fetch_add_explicit(sum, local, memory_order_relaxed);
  }
}

template <typename T>
[[kernel]] void grad_norm_general(
    device const T* x [[buffer(mlx_fused_sgd::launch::kNormIn)]],
    device atomic_float* sum [[buffer(mlx_fused_sgd::launch::kNormSum)]],
    constant const mlx_fused_sgd::launch::CheckArgs& args
    [[buffer(mlx_fused_sgd::launch::kNormArgs)]],
    constant const int* shape [[buffer(mlx_fused_sgd::launch::kNormShape)]],
    constant const int64_t* strides
    [[buffer(mlx_fused_sgd::launch::kNormStrides)]],
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
  float v = static_cast<float>(x[loc]);
  float sq = v * v;
  if (sq != 0.0f) {
    atomic_fetch_add_explicit(sum, sq, memory_order_relaxed);
  }
}

#ifndef MFS_INSTANTIATE
#define MFS_INSTANTIATE(name, func, ...)                                       \
  template [[host_name(                                                        \
      name)]] [[kernel]] decltype(func<__VA_ARGS__>) func<__VA_ARGS__>;
#endif

#define MFS_GRAD_CHECK(dtype, T)                                               \
  MFS_INSTANTIATE("grad_check_contiguous_" #dtype, grad_check_contiguous, T)   \
  MFS_INSTANTIATE("grad_check_general_" #dtype, grad_check_general, T)

#define MFS_GRAD_NORM(dtype, T)                                                \
  MFS_INSTANTIATE("grad_norm_contiguous_" #dtype, grad_norm_contiguous, T)     \
  MFS_INSTANTIATE("grad_norm_general_" #dtype, grad_norm_general, T)

MFS_GRAD_NORM(float32, float)
MFS_GRAD_NORM(float16, half)
MFS_GRAD_NORM(bfloat16, bfloat)

MFS_GRAD_CHECK(float32, float)
MFS_GRAD_CHECK(float16, half)
MFS_GRAD_CHECK(bfloat16, bfloat)
