// Metal kernels that read the gradients before the update: the non-finite
// check (skip_nonfinite) and the squared norm (max_grad_norm).
//
// The non-finite check: one uint32 flag per chunk of tensors, cleared by
// grad_check_clear and OR-ed with 1 once by any threadgroup that saw a NaN
// or an Inf (a threadgroup reduction). The test is
// mlx_fused_sgd::math::is_nonfinite from kernels/sgd_math.h, shared with the
// CPU loop; the launch facts (which elements a thread reads) are
// kernels/metal_launch.h, shared with eval_gpu.
#include <metal_stdlib>

#include "kernels/metal_launch.h"
#include "kernels/sgd_math.h"

using namespace metal;

[[kernel]] void grad_check_clear(
    device atomic_uint* flag [[buffer(mlx_fused_sgd::launch::kCheckFlag)]],
    uint gid [[thread_position_in_grid]]) {
  if (gid == 0) {
    atomic_store_explicit(flag, 0u, memory_order_relaxed);
  }
}

// Threadgroup memory a kernel declares (the Linux models of Metal define
// their own).
#ifndef MFS_THREADGROUP_ARRAY
#define MFS_THREADGROUP_ARRAY(type, name, size) threadgroup type name[size]
#endif

// The element at flat index i of a strided gradient.
inline int64_t strided_offset(
    int64_t i,
    int ndim,
    constant const int* shape,
    constant const int64_t* strides) {
  int64_t loc = 0;
  for (int d = ndim - 1; d >= 0 && i > 0; --d) {
    loc += (i % shape[d]) * strides[d];
    i /= shape[d];
  }
  return loc;
}

// The threadgroup's sum of `value`: within each SIMD group (simd_sum), then
// across the SIMD groups through `partials`; valid in SIMD group 0. Every
// thread of the threadgroup calls it (none returns early: the barrier waits
// for all of them).
inline float threadgroup_sum(
    float value,
    threadgroup float* partials,
    uint lane,
    uint simd_group,
    uint simd_groups) {
  const float group = simd_sum(value);
  if (lane == 0) {
    partials[simd_group] = group;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float total = 0.0f;
  if (simd_group == 0) {
    total = simd_sum(lane < simd_groups ? partials[lane] : 0.0f);
  }
  return total;
}

// The flag of a non-finite check: one atomic per threadgroup that saw a NaN
// or an Inf (the count of such threads, summed as floats, is exact far
// beyond a threadgroup's size).
inline void flag_if_any(
    bool bad,
    device atomic_uint* flag,
    threadgroup float* partials,
    uint lane,
    uint simd_group,
    uint simd_groups) {
  const float count = threadgroup_sum(
      bad ? 1.0f : 0.0f, partials, lane, simd_group, simd_groups);
  if (simd_group == 0 && lane == 0 && count != 0.0f) {
    atomic_fetch_or_explicit(flag, 1u, memory_order_relaxed);
  }
}

// The squared norm's part of a threadgroup, written to the threadgroup's
// slot: threadgroup `group` of a grid of `groups`, from the dispatch's first
// slot on. Every threadgroup writes its slot, zero included (the slots are
// not cleared).
inline void write_slot(
    float local,
    device float* slots,
    int64_t first_slot,
    uint2 group,
    uint2 groups,
    threadgroup float* partials,
    uint lane,
    uint simd_group,
    uint simd_groups) {
  const float total =
      threadgroup_sum(local, partials, lane, simd_group, simd_groups);
  const int64_t slot =
      first_slot + int64_t(group.x) + int64_t(groups.x) * int64_t(group.y);
  if (simd_group == 0 && lane == 0) {
    slots[slot] = total;
  }
}

template <typename T>
[[kernel]] void grad_check_contiguous(
    device const T* x [[buffer(mlx_fused_sgd::launch::kCheckIn)]],
    device atomic_uint* flag [[buffer(mlx_fused_sgd::launch::kCheckFlag)]],
    constant const mlx_fused_sgd::launch::CheckArgs& args
    [[buffer(mlx_fused_sgd::launch::kCheckArgs)]],
    uint2 gid [[thread_position_in_grid]],
    uint2 grid [[threads_per_grid]],
    uint lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint simd_groups [[simdgroups_per_threadgroup]]) {
  MFS_THREADGROUP_ARRAY(float, partials, mlx_fused_sgd::launch::kMaxSimdGroups);
  const int64_t t = int64_t(gid.x) + int64_t(grid.x) * int64_t(gid.y);
  bool bad = false;
  for (int k = 0; k < mlx_fused_sgd::launch::kReadsPerThread; ++k) {
    const int64_t i = mlx_fused_sgd::launch::grad_read_index(t, k);
    if (i < args.size) {
      bad = bad || mlx_fused_sgd::math::is_nonfinite(static_cast<float>(x[i]));
    }
  }
  flag_if_any(bad, flag, partials, lane, simd_group, simd_groups);
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
    uint2 grid [[threads_per_grid]],
    uint lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint simd_groups [[simdgroups_per_threadgroup]]) {
  MFS_THREADGROUP_ARRAY(float, partials, mlx_fused_sgd::launch::kMaxSimdGroups);
  const int64_t t = int64_t(gid.x) + int64_t(grid.x) * int64_t(gid.y);
  bool bad = false;
  for (int k = 0; k < mlx_fused_sgd::launch::kReadsPerThread; ++k) {
    const int64_t i = mlx_fused_sgd::launch::grad_read_index(t, k);
    if (i < args.size) {
      const int64_t loc = strided_offset(i, args.ndim, shape, strides);
      bad =
          bad || mlx_fused_sgd::math::is_nonfinite(static_cast<float>(x[loc]));
    }
  }
  flag_if_any(bad, flag, partials, lane, simd_group, simd_groups);
}

// The squared L2 norm of a chunk (max_grad_norm): each thread sums the
// squares of its elements in float32, its threadgroup adds those up
// (threadgroup_sum) into the threadgroup's slot, and grad_norm_sum adds the
// slots up in one fixed order: the same gradients give the same bits on
// every run, whatever order the threadgroups ran in.
[[kernel]] void grad_norm_sum(
    device const float* slots [[buffer(mlx_fused_sgd::launch::kNormSumSlots)]],
    device float* sum [[buffer(mlx_fused_sgd::launch::kNormSumOut)]],
    constant const int64_t& count
    [[buffer(mlx_fused_sgd::launch::kNormSumCount)]],
    uint tid [[thread_position_in_threadgroup]],
    uint threads [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint simd_groups [[simdgroups_per_threadgroup]]) {
  MFS_THREADGROUP_ARRAY(float, partials, mlx_fused_sgd::launch::kMaxSimdGroups);
  // Thread tid takes slots tid, tid + threads, ... in turn.
  float local = 0.0f;
  for (int64_t i = tid; i < count; i += threads) {
    local = local + slots[i];
  }
  const float total =
      threadgroup_sum(local, partials, lane, simd_group, simd_groups);
  if (simd_group == 0 && lane == 0) {
    *sum = total;
  }
}

template <typename T>
[[kernel]] void grad_norm_contiguous(
    device const T* x [[buffer(mlx_fused_sgd::launch::kNormIn)]],
    device float* slots [[buffer(mlx_fused_sgd::launch::kNormSlots)]],
    constant const mlx_fused_sgd::launch::CheckArgs& args
    [[buffer(mlx_fused_sgd::launch::kNormArgs)]],
    uint2 gid [[thread_position_in_grid]],
    uint2 grid [[threads_per_grid]],
    uint2 group [[threadgroup_position_in_grid]],
    uint2 groups [[threadgroups_per_grid]],
    uint lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint simd_groups [[simdgroups_per_threadgroup]]) {
  MFS_THREADGROUP_ARRAY(float, partials, mlx_fused_sgd::launch::kMaxSimdGroups);
  const int64_t t = int64_t(gid.x) + int64_t(grid.x) * int64_t(gid.y);
  float local = 0.0f;
  for (int k = 0; k < mlx_fused_sgd::launch::kReadsPerThread; ++k) {
    const int64_t i = mlx_fused_sgd::launch::grad_read_index(t, k);
    if (i < args.size) {
      const float v = static_cast<float>(x[i]);
      const float sq = v * v;
      local = local + sq;
    }
  }
  write_slot(
      local,
      slots,
      args.first_slot,
      group,
      groups,
      partials,
      lane,
      simd_group,
      simd_groups);
}

template <typename T>
[[kernel]] void grad_norm_general(
    device const T* x [[buffer(mlx_fused_sgd::launch::kNormIn)]],
    device float* slots [[buffer(mlx_fused_sgd::launch::kNormSlots)]],
    constant const mlx_fused_sgd::launch::CheckArgs& args
    [[buffer(mlx_fused_sgd::launch::kNormArgs)]],
    constant const int* shape [[buffer(mlx_fused_sgd::launch::kNormShape)]],
    constant const int64_t* strides
    [[buffer(mlx_fused_sgd::launch::kNormStrides)]],
    uint2 gid [[thread_position_in_grid]],
    uint2 grid [[threads_per_grid]],
    uint2 group [[threadgroup_position_in_grid]],
    uint2 groups [[threadgroups_per_grid]],
    uint lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint simd_groups [[simdgroups_per_threadgroup]]) {
  MFS_THREADGROUP_ARRAY(float, partials, mlx_fused_sgd::launch::kMaxSimdGroups);
  const int64_t t = int64_t(gid.x) + int64_t(grid.x) * int64_t(gid.y);
  float local = 0.0f;
  for (int k = 0; k < mlx_fused_sgd::launch::kReadsPerThread; ++k) {
    const int64_t i = mlx_fused_sgd::launch::grad_read_index(t, k);
    if (i < args.size) {
      const int64_t loc = strided_offset(i, args.ndim, shape, strides);
      const float v = static_cast<float>(x[loc]);
      const float sq = v * v;
      local = local + sq;
    }
  }
  write_slot(
      local,
      slots,
      args.first_slot,
      group,
      groups,
      partials,
      lane,
      simd_group,
      simd_groups);
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
