// Metal kernels of the fused SGD update. The per-element math is
// kernels/sgd_math.h, the same header the CPU loop includes; the launch facts
// (buffer slots, argument struct, names, grid) are kernels/sgd_launch.h, the
// same header eval_gpu uses. Requires Metal 3.1 (bfloat), as MLX does.
#include <metal_stdlib>

#include "kernels/sgd_launch.h"
#include "kernels/sgd_math.h"

using namespace metal;
using namespace mlx_fused_sgd;

// The learning rate of this launch, once per thread: a float32 scalar, or the
// step-decay schedule of the uint64 step counter (a few ALU ops).
inline float launch_learning_rate(
    device const float* lr,
    device const uint64_t* step,
    constant const launch::SGDArgs& args) {
  if (args.scheduled) {
    return math::step_decay_lr<uint64_t>(
        step[0], uint64_t(args.step_size), args.init, args.decay_rate);
  }
  return lr[0];
}

// The float32 constants of this launch; the gradient divisor (loss scale,
// negated for maximize) is read from its buffer only by kScaleGrad kernels.
template <bool S>
inline math::SGDHyper launch_hyper(
    constant const launch::SGDArgs& args,
    device const float* grad_scale,
    device const float* grad_multiplier) {
  math::SGDHyper h;
  h.weight_decay = args.weight_decay;
  h.momentum = args.momentum;
  h.dampening_scale = args.dampening_scale;
  h.grad_divisor = 1.0f;
  h.grad_multiplier = 1.0f;
  if (S) {
    h.grad_divisor = args.maximize ? -grad_scale[0] : grad_scale[0];
    if (args.has_clip) {
      h.grad_multiplier = grad_multiplier[0];
    }
  }
  return h;
}

inline uint64_t linear_thread(uint2 gid, uint2 grid) {
  return uint64_t(gid.x) + uint64_t(grid.x) * uint64_t(gid.y);
}

template <typename T, typename V, bool WD, bool M, bool D, bool N, bool S>
inline void update_one(
    device const T* param,
    device const T* grad,
    device const V* velocity,
    device T* param_out,
    device V* velocity_out,
    int64_t ip,
    int64_t ig,
    int64_t iv,
    int64_t io,
    float lr,
    math::SGDHyper h,
    bool copy) {
  if (copy) {
    // A skipped step (a non-finite gradient somewhere): keep everything.
    param_out[io] = param[ip];
    if (M) {
      velocity_out[io] = velocity[iv];
    }
    return;
  }
  float v = M ? static_cast<float>(velocity[iv]) : 0.0f;
  math::ParamVelocity r = math::sgd_update_element<WD, M, D, N, S>(
      static_cast<float>(param[ip]), static_cast<float>(grad[ig]), v, lr, h);
  param_out[io] = static_cast<T>(r.param);
  if (M) {
    velocity_out[io] = static_cast<V>(r.velocity);
  }
}

// Row-contiguous param, grad and velocity: kWorkPerThread elements a thread.
template <typename T, typename V, bool WD, bool M, bool D, bool N, bool S>
[[kernel]] void sgd_contiguous(
    device const T* param [[buffer(launch::kParam)]],
    device const T* grad [[buffer(launch::kGrad)]],
    device const V* velocity [[buffer(launch::kVelocity)]],
    device T* param_out [[buffer(launch::kParamOut)]],
    device V* velocity_out [[buffer(launch::kVelocityOut)]],
    device const float* lr [[buffer(launch::kLearningRate)]],
    device const uint64_t* step [[buffer(launch::kStep)]],
    constant const launch::SGDArgs& args [[buffer(launch::kSGDArgs)]],
    device const float* grad_scale [[buffer(launch::kGradScale)]],
    device const uint* skip [[buffer(launch::kSkip)]],
    device const float* grad_multiplier [[buffer(launch::kGradMultiplier)]],
    uint2 gid [[thread_position_in_grid]],
    uint2 grid [[threads_per_grid]]) {
  int64_t begin = int64_t(linear_thread(gid, grid)) * launch::kWorkPerThread;
  if (begin >= args.size) {
    return;
  }
  bool copy = args.has_skip && skip[0] != 0;
  float rate = launch_learning_rate(lr, step, args);
  math::SGDHyper h = launch_hyper<S>(args, grad_scale, grad_multiplier);
  if (begin + launch::kWorkPerThread <= args.size) {
    for (int k = 0; k < launch::kWorkPerThread; ++k) {
      int64_t i = begin + k;
      update_one<T, V, WD, M, D, N, S>(
          param,
          grad,
          velocity,
          param_out,
          velocity_out,
          i,
          i,
          i,
          i,
          rate,
          h,
          copy);
    }
  } else {
    for (int64_t i = begin; i < args.size; ++i) {
      update_one<T, V, WD, M, D, N, S>(
          param,
          grad,
          velocity,
          param_out,
          velocity_out,
          i,
          i,
          i,
          i,
          rate,
          h,
          copy);
    }
  }
}

inline int64_t strided_offset(
    int64_t elem,
    constant const int* shape,
    constant const int64_t* strides,
    int ndim) {
  int64_t loc = 0;
  for (int d = ndim - 1; d >= 0 && elem > 0; --d) {
    loc += (elem % shape[d]) * strides[d];
    elem /= shape[d];
  }
  return loc;
}

// Any strides (transposed, sliced or broadcast inputs): one element a thread,
// outputs written row-contiguous.
template <typename T, typename V, bool WD, bool M, bool D, bool N, bool S>
[[kernel]] void sgd_general(
    device const T* param [[buffer(launch::kParam)]],
    device const T* grad [[buffer(launch::kGrad)]],
    device const V* velocity [[buffer(launch::kVelocity)]],
    device T* param_out [[buffer(launch::kParamOut)]],
    device V* velocity_out [[buffer(launch::kVelocityOut)]],
    device const float* lr [[buffer(launch::kLearningRate)]],
    device const uint64_t* step [[buffer(launch::kStep)]],
    constant const launch::SGDArgs& args [[buffer(launch::kSGDArgs)]],
    constant const int* shape [[buffer(launch::kShape)]],
    constant const int64_t* param_strides [[buffer(launch::kParamStrides)]],
    constant const int64_t* grad_strides [[buffer(launch::kGradStrides)]],
    constant const int64_t* velocity_strides
    [[buffer(launch::kVelocityStrides)]],
    device const float* grad_scale [[buffer(launch::kGradScale)]],
    device const uint* skip [[buffer(launch::kSkip)]],
    device const float* grad_multiplier [[buffer(launch::kGradMultiplier)]],
    uint2 gid [[thread_position_in_grid]],
    uint2 grid [[threads_per_grid]]) {
  int64_t i = int64_t(linear_thread(gid, grid));
  if (i >= args.size) {
    return;
  }
  float rate = launch_learning_rate(lr, step, args);
  int64_t ip = strided_offset(i, shape, param_strides, args.ndim);
  int64_t ig = strided_offset(i, shape, grad_strides, args.ndim);
  int64_t iv = M ? strided_offset(i, shape, velocity_strides, args.ndim) : 0;
  update_one<T, V, WD, M, D, N, S>(
      param,
      grad,
      velocity,
      param_out,
      velocity_out,
      ip,
      ig,
      iv,
      i,
      rate,
      launch_hyper<S>(args, grad_scale, grad_multiplier),
      args.has_skip && skip[0] != 0);
}

// Instantiation by name. The Linux harness defines MFS_INSTANTIATE to record
// each (name, function) pair instead.
#ifndef MFS_INSTANTIATE
#define MFS_INSTANTIATE(name, func, ...) \
  template [[host_name(name)]] [[kernel]] decltype(func<__VA_ARGS__>) func<__VA_ARGS__>;
#endif

#define MFS_SGD_VARIANT_S(dtype, T, vdtype, V, wd, m, d, n, s) \
  MFS_INSTANTIATE(                                              \
      "sgd_contiguous_" #dtype "_" #vdtype "_" #wd #m #d #n #s,  \
      sgd_contiguous,                                           \
      T,                                                        \
      V,                                                        \
      wd,                                                       \
      m,                                                        \
      d,                                                        \
      n,                                                        \
      s)                                                        \
  MFS_INSTANTIATE(                                              \
      "sgd_general_" #dtype "_" #vdtype "_" #wd #m #d #n #s,     \
      sgd_general,                                              \
      T,                                                        \
      V,                                                        \
      wd,                                                       \
      m,                                                        \
      d,                                                        \
      n,                                                        \
      s)

// Without and with a gradient transform (grad_scale, maximize, clipping).
#define MFS_SGD_VARIANT(dtype, T, vdtype, V, wd, m, d, n) \
  MFS_SGD_VARIANT_S(dtype, T, vdtype, V, wd, m, d, n, 0)  \
  MFS_SGD_VARIANT_S(dtype, T, vdtype, V, wd, m, d, n, 1)

// Nesterov with dampening is refused by validation, so never launched.
#define MFS_SGD_WD(dtype, T, vdtype, V, wd)          \
  MFS_SGD_VARIANT(dtype, T, vdtype, V, wd, 0, 0, 0) \
  MFS_SGD_VARIANT(dtype, T, vdtype, V, wd, 1, 0, 0) \
  MFS_SGD_VARIANT(dtype, T, vdtype, V, wd, 1, 1, 0) \
  MFS_SGD_VARIANT(dtype, T, vdtype, V, wd, 1, 0, 1)

#define MFS_SGD_TYPES(dtype, T, vdtype, V) \
  MFS_SGD_WD(dtype, T, vdtype, V, 0)       \
  MFS_SGD_WD(dtype, T, vdtype, V, 1)

// Params and momentum buffers of one dtype, and half params with float32
// momentum buffers (state_dtype=float32).
MFS_SGD_TYPES(float32, float, float32, float)
MFS_SGD_TYPES(float16, half, float16, half)
MFS_SGD_TYPES(bfloat16, bfloat, bfloat16, bfloat)
MFS_SGD_TYPES(float16, half, float32, float)
MFS_SGD_TYPES(bfloat16, bfloat, float32, float)
