// Metal kernels of the fused SGD update. The per-element math is
// kernels/sgd_math.h, the same header the CPU loop includes; the loads and
// stores around it and the launch's constants are kernels/sgd_element.h,
// shared with the CUDA kernels; the launch facts (buffer slots, names, grid)
// are kernels/metal_launch.h, the same header eval_gpu uses, and the launch
// constants kernels/sgd_plan.h. Requires Metal 3.1 (bfloat), as MLX does.
#include <metal_stdlib>

#include "kernels/metal_launch.h"
#include "kernels/sgd_element.h"
#include "kernels/sgd_math.h"

using namespace metal;

inline uint64_t linear_thread(uint2 gid, uint2 grid) {
  return uint64_t(gid.x) + uint64_t(grid.x) * uint64_t(gid.y);
}

using mlx_fused_sgd::element::launch_rounding_stream;
using mlx_fused_sgd::element::launch_step_scalars;
using mlx_fused_sgd::element::Offsets;
using mlx_fused_sgd::element::TensorBuffers;
using mlx_fused_sgd::element::update_one;

// Row-contiguous param, grad, velocity and master: kWorkPerThread elements a
// thread.
template <typename T, typename V, bool M, int R>
[[kernel]] void sgd_contiguous(
    device const T* param [[buffer(mlx_fused_sgd::launch::kParam)]],
    device const T* grad [[buffer(mlx_fused_sgd::launch::kGrad)]],
    device const V* velocity [[buffer(mlx_fused_sgd::launch::kVelocity)]],
    device T* param_out [[buffer(mlx_fused_sgd::launch::kParamOut)]],
    device V* velocity_out [[buffer(mlx_fused_sgd::launch::kVelocityOut)]],
    device const float* lr [[buffer(mlx_fused_sgd::launch::kLearningRate)]],
    device const uint64_t* step [[buffer(mlx_fused_sgd::launch::kStep)]],
    constant const mlx_fused_sgd::launch::SGDArgs& args
    [[buffer(mlx_fused_sgd::launch::kSGDArgs)]],
    device const float* grad_scale
    [[buffer(mlx_fused_sgd::launch::kGradScale)]],
    device const uint* skip [[buffer(mlx_fused_sgd::launch::kSkip)]],
    device const float* clip_factor
    [[buffer(mlx_fused_sgd::launch::kClipFactor)]],
    device const float* master [[buffer(mlx_fused_sgd::launch::kMaster)]],
    device float* master_out [[buffer(mlx_fused_sgd::launch::kMasterOut)]],
    device const uint64_t* rounding_step
    [[buffer(mlx_fused_sgd::launch::kRoundingStep)]],
    uint2 gid [[thread_position_in_grid]],
    uint2 grid [[threads_per_grid]]) {
  int64_t begin =
      int64_t(linear_thread(gid, grid)) * mlx_fused_sgd::launch::kWorkPerThread;
  if (begin >= args.size) {
    return;
  }
  bool copy = args.has_skip && skip[0] != 0;
  mlx_fused_sgd::math::StepScalars scalars =
      launch_step_scalars(lr, step, grad_scale, clip_factor, args);
  uint64_t stream = launch_rounding_stream<R>(
      rounding_step, args.rounding_seed, args.rounding_tensor);
  TensorBuffers<T, V> b = {
      param, grad, velocity, param_out, velocity_out, master, master_out};
  int64_t end = begin + mlx_fused_sgd::launch::kWorkPerThread;
  if (end <= args.size) {
    for (int k = 0; k < mlx_fused_sgd::launch::kWorkPerThread; ++k) {
      int64_t i = begin + k;
      update_one<T, V, M, R>(
          b,
          Offsets{i, i, i, i, i},
          uint64_t(i),
          scalars,
          args.hyper,
          stream,
          copy);
    }
  } else {
    for (int64_t i = begin; i < args.size; ++i) {
      update_one<T, V, M, R>(
          b,
          Offsets{i, i, i, i, i},
          uint64_t(i),
          scalars,
          args.hyper,
          stream,
          copy);
    }
  }
}

// Any strides (transposed, sliced or broadcast inputs), over the layout
// mlx_fused_sgd::launch::plan_strided made on the host: (outer..., rows, cols),
// with the axis a transposed operand is contiguous along as the rows. A thread
// updates one column of kRowsPerThread consecutive rows, stepping each
// operand's offset by its row stride: adjacent threads take adjacent columns
// (row-major operands and the outputs are read and written coalesced), and
// a transposed operand is read as consecutive elements by each thread. The
// outputs are row-major (out_strides over the layout's axes).
template <typename T, typename V, bool M, int R>
[[kernel]] void sgd_general(
    device const T* param [[buffer(mlx_fused_sgd::launch::kParam)]],
    device const T* grad [[buffer(mlx_fused_sgd::launch::kGrad)]],
    device const V* velocity [[buffer(mlx_fused_sgd::launch::kVelocity)]],
    device T* param_out [[buffer(mlx_fused_sgd::launch::kParamOut)]],
    device V* velocity_out [[buffer(mlx_fused_sgd::launch::kVelocityOut)]],
    device const float* lr [[buffer(mlx_fused_sgd::launch::kLearningRate)]],
    device const uint64_t* step [[buffer(mlx_fused_sgd::launch::kStep)]],
    constant const mlx_fused_sgd::launch::SGDArgs& args
    [[buffer(mlx_fused_sgd::launch::kSGDArgs)]],
    constant const int64_t* shape [[buffer(mlx_fused_sgd::launch::kShape)]],
    constant const int64_t* param_strides
    [[buffer(mlx_fused_sgd::launch::kParamStrides)]],
    constant const int64_t* grad_strides
    [[buffer(mlx_fused_sgd::launch::kGradStrides)]],
    constant const int64_t* velocity_strides
    [[buffer(mlx_fused_sgd::launch::kVelocityStrides)]],
    device const float* grad_scale
    [[buffer(mlx_fused_sgd::launch::kGradScale)]],
    device const uint* skip [[buffer(mlx_fused_sgd::launch::kSkip)]],
    device const float* clip_factor
    [[buffer(mlx_fused_sgd::launch::kClipFactor)]],
    device const float* master [[buffer(mlx_fused_sgd::launch::kMaster)]],
    device float* master_out [[buffer(mlx_fused_sgd::launch::kMasterOut)]],
    device const uint64_t* rounding_step
    [[buffer(mlx_fused_sgd::launch::kRoundingStep)]],
    constant const int64_t* master_strides
    [[buffer(mlx_fused_sgd::launch::kMasterStrides)]],
    constant const int64_t* out_strides
    [[buffer(mlx_fused_sgd::launch::kOutStrides)]],
    uint2 gid [[thread_position_in_grid]],
    uint2 grid [[threads_per_grid]]) {
  mlx_fused_sgd::element::Band band;
  if (!mlx_fused_sgd::element::band_of(
          int64_t(linear_thread(gid, grid)),
          shape,
          args.ndim,
          args.size,
          band)) {
    return;
  }
  mlx_fused_sgd::math::StepScalars scalars =
      launch_step_scalars(lr, step, grad_scale, clip_factor, args);
  uint64_t stream = launch_rounding_stream<R>(
      rounding_step, args.rounding_seed, args.rounding_tensor);
  bool copy = args.has_skip && skip[0] != 0;
  TensorBuffers<T, V> b = {
      param, grad, velocity, param_out, velocity_out, master, master_out};
  const mlx_fused_sgd::element::LayoutStrides strides = {
      param_strides,
      grad_strides,
      velocity_strides,
      master_strides,
      out_strides};
  mlx_fused_sgd::element::update_band<T, V, M, R>(
      b,
      shape,
      strides,
      args.ndim,
      band,
      scalars,
      args.hyper,
      stream,
      copy);
}

// Instantiation by name. The Linux harness defines MFS_INSTANTIATE to record
// each (name, function) pair instead.
#ifndef MFS_INSTANTIATE
#define MFS_INSTANTIATE(name, func, ...)                                       \
  template [[host_name(                                                        \
      name)]] [[kernel]] decltype(func<__VA_ARGS__>) func<__VA_ARGS__>;
#endif

// Two kernels (contiguous and general) for each thing that changes the
// types or the memory traffic: the param dtype, the momentum buffer (absent,
// of the param's dtype, or float32 for half params) and how updated params
// are stored. Weight decay, dampening, Nesterov and the gradient transforms
// (grad_scale, maximize, clipping, skip) are SGDArgs' run-time flags.
#define MFS_SGD_KERNELS(name, T, V, m, r)                                      \
  MFS_INSTANTIATE("sgd_contiguous_" name, sgd_contiguous, T, V, m, r)          \
  MFS_INSTANTIATE("sgd_general_" name, sgd_general, T, V, m, r)

// Name suffixes of the storage modes: "" (round to nearest), "_sr"
// (stochastic rounding, bfloat16 params), "_mw" (master weights, half
// params).
#define MFS_SGD_nearest(dtype, T, vdtype, V, m)                                \
  MFS_SGD_KERNELS(                                                             \
      #dtype "_" #vdtype "_" #m, T, V, m, mlx_fused_sgd::math::kRoundNearest)
#define MFS_SGD_stochastic(dtype, T, vdtype, V, m)                             \
  MFS_SGD_KERNELS(                                                             \
      #dtype "_" #vdtype "_" #m "_sr",                                         \
      T,                                                                       \
      V,                                                                       \
      m,                                                                       \
      mlx_fused_sgd::math::kRoundStochastic)
#define MFS_SGD_master(dtype, T, vdtype, V, m)                                 \
  MFS_SGD_KERNELS(                                                             \
      #dtype "_" #vdtype "_" #m "_mw",                                         \
      T,                                                                       \
      V,                                                                       \
      m,                                                                       \
      mlx_fused_sgd::math::kMasterWeights)

// Without momentum (no buffer; named with the param's dtype twice).
MFS_SGD_nearest(float32, float, float32, float, 0)
MFS_SGD_nearest(float16, half, float16, half, 0)
MFS_SGD_nearest(bfloat16, bfloat, bfloat16, bfloat, 0)
MFS_SGD_stochastic(bfloat16, bfloat, bfloat16, bfloat, 0)
MFS_SGD_master(float16, half, float16, half, 0)
MFS_SGD_master(bfloat16, bfloat, bfloat16, bfloat, 0)
// With momentum: buffers of the param's dtype, and float32 buffers of half
// params (state_dtype=float32).
MFS_SGD_nearest(float32, float, float32, float, 1)
MFS_SGD_nearest(float16, half, float16, half, 1)
MFS_SGD_nearest(bfloat16, bfloat, bfloat16, bfloat, 1)
MFS_SGD_nearest(float16, half, float32, float, 1)
MFS_SGD_nearest(bfloat16, bfloat, float32, float, 1)
MFS_SGD_stochastic(bfloat16, bfloat, bfloat16, bfloat, 1)
MFS_SGD_stochastic(bfloat16, bfloat, float32, float, 1)
MFS_SGD_master(float16, half, float16, half, 1)
MFS_SGD_master(float16, half, float32, float, 1)
MFS_SGD_master(bfloat16, bfloat, bfloat16, bfloat, 1)
MFS_SGD_master(bfloat16, bfloat, float32, float, 1)
