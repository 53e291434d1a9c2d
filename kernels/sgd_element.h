// One element of a GPU update: the loads, the per-element math of
// kernels/sgd_math.h, and the stores (a skipped step's copy, master weights,
// stochastic rounding). Shared by the Metal kernels (kernels/*.metal) and the
// CUDA kernels (kernels/*.cuh), which differ only in how they pick elements;
// the CPU loop reads its step's scalars with launch_step_scalars too.
#pragma once

#include "kernels/sgd_plan.h"
#include "kernels/sgd_math.h"

#ifdef __METAL_VERSION__
// Metal's address spaces: the tensors are in device memory, a kernel's
// locals in thread memory.
#define MFS_DEVICE device
#define MFS_THREAD thread
#else
#define MFS_DEVICE
#define MFS_THREAD
#endif

namespace mlx_fused_sgd {
namespace element {

// The buffers of one tensor's update. Master weights (R == kMasterWeights):
// the float32 master is read in place of the param and written to
// master_out, and param_out gets its rounded copy.
template <typename T, typename V> struct TensorBuffers {
  MFS_DEVICE const T* param;
  MFS_DEVICE const T* grad;
  MFS_DEVICE const V* velocity;
  MFS_DEVICE T* param_out;
  MFS_DEVICE V* velocity_out;
  MFS_DEVICE const float* master;
  MFS_DEVICE float* master_out;
};

// Element offsets: ip, ig, iv, im into the inputs; io (the element's index)
// into the outputs.
struct Offsets {
  int64_t ip;
  int64_t ig;
  int64_t iv;
  int64_t im;
  int64_t io;
};

// The values a launch reads on the device, once per thread: the learning
// rate (a float32 scalar, or the step-decay schedule of the uint64 step
// counter: a few ALU ops), and, where the launch transforms the gradient,
// its divisor (the loss scale, negated for maximize) and clip factor.
MFS_INLINE math::StepScalars launch_step_scalars(
    MFS_DEVICE const float* lr,
    MFS_DEVICE const uint64_t* step,
    MFS_DEVICE const float* grad_scale,
    MFS_DEVICE const float* clip_factor,
    MFS_CONSTANT const launch::SGDArgs& args) {
  math::StepScalars s = {0.0f, 1.0f, 1.0f};
  if (args.scheduled) {
    s.lr = math::step_decay_lr<uint64_t>(
        step[0], uint64_t(args.step_size), args.init, args.decay_rate);
  } else {
    s.lr = lr[0];
  }
  if (args.hyper.scale_grad) {
    s.grad_divisor = args.maximize ? -grad_scale[0] : grad_scale[0];
    if (args.has_clip) {
      s.clip_factor = clip_factor[0];
    }
  }
  return s;
}

// The random rounding stream of tensor `tensor` (its place in the whole
// update) at this step; kRoundStochastic kernels only.
template <int R>
MFS_INLINE uint64_t launch_rounding_stream(
    MFS_DEVICE const uint64_t* rounding_step, uint64_t seed, uint64_t tensor) {
  if (R != math::kRoundStochastic) {
    return 0;
  }
  return math::rounding_stream(seed, rounding_step[0], tensor);
}

// Updates one element, the element-th of its tensor in row-major order (the
// index its stochastic-rounding bits derive from); `copy` (a skipped step: a
// non-finite gradient somewhere) keeps everything as it was.
template <typename T, typename V, bool M, int R>
MFS_INLINE void update_one(
    MFS_THREAD const TensorBuffers<T, V>& b,
    Offsets at,
    uint64_t element,
    math::StepScalars s,
    MFS_CONSTANT const math::SGDHyper& h,
    uint64_t stream,
    bool copy) {
  constexpr bool kUseMaster = R == math::kMasterWeights;
  if (copy) {
    b.param_out[at.io] = b.param[at.ip];
    if (M) {
      b.velocity_out[at.io] = b.velocity[at.iv];
    }
    if (kUseMaster) {
      b.master_out[at.io] = b.master[at.im];
    }
    return;
  }
  float p = static_cast<float>(b.param[at.ip]);
  if (kUseMaster) {
    const float m = b.master[at.im];
    p = math::master_or_param(m, static_cast<float>(static_cast<T>(m)), p);
  }
  float v = M ? static_cast<float>(b.velocity[at.iv]) : 0.0f;
  math::ParamVelocity r = math::sgd_update_element<M>(
      p, static_cast<float>(b.grad[at.ig]), v, s, h);
  if (kUseMaster) {
    b.master_out[at.io] = r.param;
  }
  if (R == math::kRoundStochastic) {
    r.param = math::round_bf16_stochastic(
        r.param, math::rounding_bits(stream, element));
  }
  b.param_out[at.io] = static_cast<T>(r.param);
  if (M) {
    b.velocity_out[at.io] = static_cast<V>(r.velocity);
  }
}

// The offset of outer index `outer` over the layout's outer axes (all but
// the last two), once per thread.
MFS_INLINE int64_t outer_offset(
    int64_t outer,
    MFS_CONSTANT const int64_t* shape,
    MFS_CONSTANT const int64_t* strides,
    int outer_ndim) {
  int64_t loc = 0;
  for (int d = outer_ndim - 1; d >= 0 && outer > 0; --d) {
    loc += (outer % shape[d]) * strides[d];
    outer /= shape[d];
  }
  return loc;
}

// The offset of an operand's element (outer, r0, c) of the layout.
MFS_INLINE int64_t layout_start(
    int64_t outer,
    int64_t r0,
    int64_t c,
    MFS_CONSTANT const int64_t* shape,
    MFS_CONSTANT const int64_t* strides,
    int nd) {
  return outer_offset(outer, shape, strides, nd - 2) + r0 * strides[nd - 2] +
         c * strides[nd - 1];
}

// Element strides of each operand of a strided update over its layout
// (launch::plan_strided); the outputs are row-major over it.
struct LayoutStrides {
  MFS_CONSTANT const int64_t* param;
  MFS_CONSTANT const int64_t* grad;
  MFS_CONSTANT const int64_t* velocity;
  MFS_CONSTANT const int64_t* master;
  MFS_CONSTANT const int64_t* out;
};

// The band of a strided update's thread t: column c of launch::kRowsPerThread
// rows from r0 of outer index `outer`; false past the end.
struct Band {
  int64_t outer;
  int64_t r0;
  int64_t c;
};

MFS_INLINE bool band_of(
    int64_t t,
    MFS_CONSTANT const int64_t* shape,
    int nd,
    int64_t size,
    MFS_THREAD Band& band) {
  const int64_t rows = shape[nd - 2];
  const int64_t cols = shape[nd - 1];
  const int64_t bands =
      (rows + launch::kRowsPerThread - 1) / launch::kRowsPerThread;
  band.c = t % cols;
  const int64_t rest = t / cols;
  band.r0 = (rest % bands) * launch::kRowsPerThread;
  band.outer = rest / bands;
  return band.outer * rows * cols < size;
}

// One thread of a strided update (any strides: transposed, sliced or
// broadcast operands), over the layout (outer..., rows, cols) that
// launch::plan_strided made on the host, with the axis a transposed operand
// is contiguous along as the rows: column c of launch::kRowsPerThread
// consecutive rows from r0, stepping each operand's offset by its row
// stride. Adjacent threads take adjacent columns (row-major operands and
// the outputs are read and written coalesced), and a transposed operand is
// read as consecutive elements by each thread.
template <typename T, typename V, bool M, int R>
MFS_INLINE void update_band(
    MFS_THREAD const TensorBuffers<T, V>& b,
    MFS_CONSTANT const int64_t* shape,
    MFS_THREAD const LayoutStrides& strides,
    int nd,
    Band band,
    math::StepScalars s,
    MFS_CONSTANT const math::SGDHyper& h,
    uint64_t stream,
    bool copy) {
  constexpr bool kUseMaster = R == math::kMasterWeights;
  const int64_t rows = shape[nd - 2];
  const int64_t outer = band.outer;
  const int64_t r0 = band.r0;
  const int64_t c = band.c;
  Offsets at = {
      layout_start(outer, r0, c, shape, strides.param, nd),
      layout_start(outer, r0, c, shape, strides.grad, nd),
      M ? layout_start(outer, r0, c, shape, strides.velocity, nd) : 0,
      kUseMaster ? layout_start(outer, r0, c, shape, strides.master, nd) : 0,
      layout_start(outer, r0, c, shape, strides.out, nd)};
  const Offsets row_step = {
      strides.param[nd - 2],
      strides.grad[nd - 2],
      M ? strides.velocity[nd - 2] : 0,
      kUseMaster ? strides.master[nd - 2] : 0,
      strides.out[nd - 2]};
  const int64_t r_last = r0 + launch::kRowsPerThread;
  const int64_t r_end = r_last < rows ? r_last : rows;
  for (int64_t r = r0; r < r_end; ++r) {
    update_one<T, V, M, R>(b, at, uint64_t(at.io), s, h, stream, copy);
    at.ip += row_step.ip;
    at.ig += row_step.ig;
    at.iv += row_step.iv;
    at.im += row_step.im;
    at.io += row_step.io;
  }
}

} // namespace element
} // namespace mlx_fused_sgd
