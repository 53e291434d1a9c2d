// The plan of an update that every backend shares: the launch constants
// (the structs the GPU kernels take, one layout in C++, Metal and CUDA), the
// variant of an update, the strided layout of a tensor whose operands are not
// all row-contiguous (walked alike by the CPU loop and the GPU kernels), and
// the multi-tensor plan (which tensors each launch updates, and which tensor
// each block of a launch belongs to). Backend-specific launch facts are
// kernels/metal_launch.h and kernels/cuda_launch.h.
#pragma once

#ifndef __METAL_VERSION__
#include <algorithm>
#include <cstdint>
#include <vector>
#endif

// MFS_CONSTANT, the constants' address space, comes with the math header.
#include "kernels/sgd_math.h"

namespace mlx_fused_sgd {
namespace launch {

// Rows each thread of a general kernel updates, stepping along the layout's
// row axis: adjacent threads take adjacent columns (row-major operands are
// read and written coalesced), and a transposed operand, contiguous along
// the rows, is read as kRowsPerThread consecutive elements by each thread.
MFS_CONSTANT constexpr int kRowsPerThread = 8;

// The operands of a strided update, in StridedLayout::strides.
MFS_CONSTANT constexpr int kLayoutParam = 0;
MFS_CONSTANT constexpr int kLayoutGrad = 1;
MFS_CONSTANT constexpr int kLayoutVelocity = 2;
MFS_CONSTANT constexpr int kLayoutMaster = 3;
MFS_CONSTANT constexpr int kLayoutOut = 4; // the row-major outputs
MFS_CONSTANT constexpr int kLayoutOperands = 5;

// Constants of one SGD launch (64-bit fields first: one layout in C++ and
// Metal).
struct SGDArgs {
  int64_t size;             // elements of the tensor
  int64_t step_size;        // step decay, when scheduled
  uint64_t rounding_seed;   // stochastic rounding: the user's seed
  uint64_t rounding_tensor; // ... and this tensor's index in the update
  // The update's options as the per-element math takes them (its float32
  // constants and run-time flags); the kernels read them here, by
  // reference.
  math::SGDHyper hyper;
  float init;        // float32(init), when scheduled
  float decay_rate;  // float32(decay_rate), when scheduled
  int32_t scheduled; // 1: lr from the step counter; 0: from kLearningRate
  int32_t ndim;      // general kernels: the StridedLayout's axes
  int32_t maximize;  // the loss scale (kGradScale) is negated
  int32_t has_skip;  // a nonzero kSkip flag makes the update a copy
  int32_t has_clip;  // the gradient is multiplied by kClipFactor's factor
};

struct StepDecayArgs {
  int64_t size;
  int64_t step_size;
  float init;
  float decay_rate;
  int32_t ndim;
};

// The tensor of a multi-tensor launch that owns block `block`: tensor t owns
// blocks [block_end[t - 1], block_end[t]) (block_end[-1] = 0). A linear
// search over the launch's prefix sums, once per block.
MFS_INLINE int
span_tensor(MFS_CONSTANT const int64_t* block_end, int count, int64_t block) {
  int t = 0;
  while (t + 1 < count && block >= block_end[t]) {
    ++t;
  }
  return t;
}

#ifndef __METAL_VERSION__

// The element types of params and momentum buffers the kernels take.
enum class ElementType : uint8_t { float32, float16, bfloat16 };

// Which device inputs an update reads besides its tensors and learning rate.
struct SGDInputs {
  bool grad_scale = false; // a loss scale
  bool skip = false; // a skip flag (skip_nonfinite): a set flag copies instead
  bool clip = false; // a clip factor (max_grad_norm)
};

// Which kernel variant an update needs and the options of its math
// (math::hyper_of: decided and rounded once, as stock does).
struct SGDVariant {
  bool momentum; // a momentum buffer is read and written
  bool maximize;
  bool skip; // SGDInputs::skip
  bool clip; // SGDInputs::clip
  // How updated params are stored: math::kRoundNearest, kRoundStochastic
  // (with a step input and `seed`) or kMasterWeights (with master inputs).
  int rounding;
  uint64_t seed;
  math::SGDHyper hyper;

  static SGDVariant from(
      const math::SGDOptions& options,
      SGDInputs inputs = {},
      int rounding = math::kRoundNearest,
      uint64_t seed = 0) {
    SGDVariant v;
    v.momentum = options.momentum > 0;
    v.maximize = options.maximize;
    v.skip = inputs.skip;
    v.clip = inputs.clip;
    v.rounding = rounding;
    v.seed = rounding == math::kRoundStochastic ? seed : 0;
    v.hyper = math::hyper_of(options, inputs.grad_scale || inputs.clip);
    return v;
  }

  // The run-time flags, kept once, in the per-element math's options.
  bool weight_decay() const {
    return hyper.has_weight_decay;
  }
  bool dampening() const {
    return hyper.has_dampening;
  }
  bool nesterov() const {
    return hyper.nesterov;
  }
  // A grad_scale input, maximize or clipping: the gradient is transformed.
  bool scale_grad() const {
    return hyper.scale_grad;
  }

  bool operator==(const SGDVariant&) const = default;
};

// How a tensor whose operands are not all row-contiguous is walked, by the
// CPU loop and by the general Metal kernels alike (planned once per tensor
// on the host by plan_strided). Size-1 axes are dropped and adjacent axes
// merged wherever every operand steps over them as one; then the two axes
// of the "tile plane" are put last: the columns (the last axis, along which
// the row-major outputs are contiguous) and the rows, the axis along which a
// transposed operand is contiguous (the second-last axis otherwise). The
// other axes, in front, are the outer axes. 1-D layouts get a rows axis of
// size 1.
struct StridedLayout {
  std::vector<int64_t> shape; // (outer..., rows, cols)
  // Element strides of each operand over `shape` (kLayoutParam ...
  // kLayoutOut); an absent operand (no momentum, no master copy) gets the
  // outputs' strides and is never read.
  std::vector<int64_t> strides[kLayoutOperands];

  int ndim() const {
    return static_cast<int>(shape.size());
  }
  int64_t rows() const {
    return shape[ndim() - 2];
  }
  int64_t cols() const {
    return shape[ndim() - 1];
  }
  int64_t outer_size() const {
    int64_t n = 1;
    for (int d = 0; d + 2 < ndim(); ++d) {
      n *= shape[d];
    }
    return n;
  }
  int64_t row_stride(int op) const {
    return strides[op][ndim() - 2];
  }
  int64_t col_stride(int op) const {
    return strides[op][ndim() - 1];
  }
  // Read along the rows: contiguous down a column, not along a row.
  bool transposed(int op) const {
    return rows() > 1 && col_stride(op) != 1 && row_stride(op) == 1;
  }
};

// The layout of one tensor of `ndim` axes of `shape`, with the element
// strides of each input operand (nullptr: absent). Shape and strides are
// MLX's (any integer vector types).
template <typename ShapeT, typename StridesT>
StridedLayout
plan_strided(const ShapeT& shape, const StridesT* const (&inputs)[kLayoutOut]) {
  const int ndim = static_cast<int>(shape.size());
  // Axes of size > 1, merged from the last: axis a folds into the one after
  // it when every present operand's stride on a equals its stride on the
  // next axis times that axis's size (always true of row-major outputs).
  std::vector<int64_t> dims;
  std::vector<int64_t> strides[kLayoutOut];
  for (int a = ndim - 1; a >= 0; --a) {
    const int64_t n = static_cast<int64_t>(shape[a]);
    if (n == 1) {
      continue;
    }
    bool merge = !dims.empty();
    for (int op = 0; merge && op < kLayoutOut; ++op) {
      if (inputs[op] != nullptr) {
        merge = int64_t((*inputs[op])[a]) == strides[op].back() * dims.back();
      }
    }
    if (merge) {
      dims.back() *= n;
      continue;
    }
    dims.push_back(n);
    for (int op = 0; op < kLayoutOut; ++op) {
      strides[op].push_back(
          inputs[op] != nullptr ? int64_t((*inputs[op])[a]) : 0);
    }
  }
  // Built last axis first; at least two axes (rows, cols).
  while (dims.size() < 2) {
    dims.push_back(1);
    for (auto& s : strides) {
      s.push_back(0);
    }
  }
  StridedLayout layout;
  layout.shape.assign(dims.rbegin(), dims.rend());
  for (int op = 0; op < kLayoutOut; ++op) {
    layout.strides[op].assign(strides[op].rbegin(), strides[op].rend());
  }
  const int nd = layout.ndim();
  auto& out = layout.strides[kLayoutOut];
  out.assign(nd, 1);
  for (int d = nd - 2; d >= 0; --d) {
    out[d] = out[d + 1] * layout.shape[d + 1];
  }
  // The rows axis: the one along which the first operand that is not
  // contiguous along the columns is contiguous, if any.
  int row_axis = nd - 2;
  for (int op = 0; op < kLayoutOut && row_axis == nd - 2; ++op) {
    if (inputs[op] == nullptr || layout.strides[op][nd - 1] == 1) {
      continue;
    }
    for (int d = 0; d < nd - 1; ++d) {
      if (layout.strides[op][d] == 1 && layout.shape[d] > 1) {
        row_axis = d;
        break;
      }
    }
  }
  if (row_axis != nd - 2) {
    auto move_to_rows = [&](auto& v) {
      auto x = v[row_axis];
      v.erase(v.begin() + row_axis);
      v.insert(v.end() - 1, x);
    };
    move_to_rows(layout.shape);
    for (auto& s : layout.strides) {
      move_to_rows(s);
    }
  }
  for (int op = 0; op < kLayoutOut; ++op) {
    if (inputs[op] == nullptr) {
      layout.strides[op] = out;
    }
  }
  return layout;
}

// A step-decay schedule folded into a launch (absent: a float32 lr buffer).
struct FusedSchedule {
  bool enabled;
  double init;
  double decay_rate;
  int64_t step_size;
};

// The launch constants of one tensor's update (`ndim`: the axes of its
// strided layout, 0 when its operands are row-contiguous; `tensor_index`:
// its place in the whole update, which picks its random rounding stream).
inline SGDArgs sgd_args(
    const SGDVariant& v,
    const FusedSchedule& schedule,
    int64_t size,
    int ndim = 0,
    uint64_t tensor_index = 0) {
  SGDArgs args;
  args.size = size;
  args.step_size = schedule.enabled ? schedule.step_size : 1;
  args.rounding_seed = v.seed;
  args.rounding_tensor = tensor_index;
  args.hyper = v.hyper;
  args.init = static_cast<float>(schedule.init);
  args.decay_rate = static_cast<float>(schedule.decay_rate);
  args.scheduled = schedule.enabled ? 1 : 0;
  args.ndim = ndim;
  args.maximize = v.maximize ? 1 : 0;
  args.has_skip = v.skip ? 1 : 0;
  args.has_clip = v.clip ? 1 : 0;
  return args;
}

inline StepDecayArgs step_decay_args(
    int64_t size, int ndim, double init, double decay_rate, int64_t step_size) {
  StepDecayArgs args;
  args.size = size;
  args.step_size = step_size;
  args.init = static_cast<float>(init);
  args.decay_rate = static_cast<float>(decay_rate);
  args.ndim = ndim;
  return args;
}

// The multi-tensor plan (Apex's multi-tensor apply): a list of tensors cut
// into launches of at most `max_tensors` consecutive tensors, each tensor
// into blocks of `chunk` elements, with the launch's block prefix sums. The
// capacity is the backend's: what one launch's arguments can hold (CUDA: a
// table passed by value within 4 KB of kernel parameters; Metal would be
// bounded by its 31 buffer slots and 4 KB of inline bytes). Empty tensors
// get no blocks.
struct TensorSpan {
  int first;
  int count;
  std::vector<int64_t> block_end;
  int64_t blocks() const {
    return block_end.empty() ? 0 : block_end.back();
  }
};

inline std::vector<TensorSpan> split_spans(
    const std::vector<int64_t>& sizes, int max_tensors, int64_t chunk) {
  std::vector<TensorSpan> spans;
  const int n = static_cast<int>(sizes.size());
  for (int i = 0; i < n; i += max_tensors) {
    TensorSpan span;
    span.first = i;
    span.count = std::min(max_tensors, n - i);
    int64_t blocks = 0;
    for (int k = 0; k < span.count; ++k) {
      blocks += (sizes[i + k] + chunk - 1) / chunk;
      span.block_end.push_back(blocks);
    }
    spans.push_back(std::move(span));
  }
  return spans;
}

#endif

} // namespace launch
} // namespace mlx_fused_sgd
