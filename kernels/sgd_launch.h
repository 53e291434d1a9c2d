// How the Metal kernels are launched: buffer slots, the argument struct,
// kernel names and the grid. Shared by eval_gpu (csrc/) and by the Linux test
// harness that runs the kernels on the CPU (tests/metal_harness.cpp), so the
// harness cannot drift from what eval_gpu binds.
#pragma once

#ifdef __METAL_VERSION__
#define MFS_CONSTANT constant
#else
#include <cstdint>
#include <string>
#include <utility>
#include <vector>
#define MFS_CONSTANT
#endif

#include "kernels/sgd_math.h"

namespace mlx_fused_sgd {
namespace launch {

// Elements each thread of a contiguous kernel updates (a tail thread fewer).
MFS_CONSTANT constexpr int kWorkPerThread = 4;

// Buffer slots of the SGD kernels.
MFS_CONSTANT constexpr int kParam = 0;
MFS_CONSTANT constexpr int kGrad = 1;
MFS_CONSTANT constexpr int kVelocity = 2; // bound to grad when momentum is off
MFS_CONSTANT constexpr int kParamOut = 3;
MFS_CONSTANT constexpr int kVelocityOut = 4;  // bound to param_out likewise
MFS_CONSTANT constexpr int kLearningRate = 5; // float32 scalar
MFS_CONSTANT constexpr int kStep = 6; // uint64 scalar (scheduled kernels)
MFS_CONSTANT constexpr int kSGDArgs = 7;
MFS_CONSTANT constexpr int kShape = 8; // general kernels: StridedLayout
MFS_CONSTANT constexpr int kParamStrides = 9;
MFS_CONSTANT constexpr int kGradStrides = 10;
MFS_CONSTANT constexpr int kVelocityStrides = 11;
MFS_CONSTANT constexpr int kGradScale = 12; // float32 scalar (args.scale_grad)
MFS_CONSTANT constexpr int kSkip = 13;      // uint32 scalar (args.has_skip)
MFS_CONSTANT constexpr int kClipFactor = 14; // float32 (args.has_clip)
// Master weights (kMasterWeights kernels): the float32 copy read in place of
// the param, and its update; bound to param and param_out otherwise.
MFS_CONSTANT constexpr int kMaster = 15;
MFS_CONSTANT constexpr int kMasterOut = 16;
// uint64 step counter the random rounding bits derive from
// (kRoundStochastic kernels); bound to the learning rate otherwise.
MFS_CONSTANT constexpr int kRoundingStep = 17;
MFS_CONSTANT constexpr int kMasterStrides = 18; // general kernels only
// Element strides of the row-major outputs over the general kernels' layout
// (its axes are reordered, so the output offset is not the thread index).
MFS_CONSTANT constexpr int kOutStrides = 19;

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

// Buffer slots of the non-finite check kernels.
MFS_CONSTANT constexpr int kCheckIn = 0;
MFS_CONSTANT constexpr int kCheckFlag = 1; // uint32, OR-ed with 1 on a hit
MFS_CONSTANT constexpr int kCheckArgs = 2;
MFS_CONSTANT constexpr int kCheckShape = 3; // general kernels only
MFS_CONSTANT constexpr int kCheckStrides = 4;

// The squared-norm kernels (max_grad_norm) use the same layout, with slots
// of float32 in place of the flag: threadgroup k of a dispatch (row-major
// over the grid's threadgroups) writes its sum to slot args.first_slot + k.
// "grad_norm_sum" then adds the slots up in one fixed order, so that the
// norm has the same bits whatever order the threadgroups ran in
// (data-parallel ranks that clip by it stay in step).
//
// Both gradient reads reduce within a SIMD group (simd_sum), then across
// the threadgroup's SIMD groups: the check makes one atomic per threadgroup
// that saw a NaN or an Inf, the norm one write per threadgroup. A SIMD
// group of kSimdWidth threads reads kReadsPerThread * kSimdWidth consecutive
// elements, lane-interleaved (each step of the group one coalesced run; see
// grad_read_index). Threads past the end read nothing but still join the
// reduction. Threadgroups are whole SIMD groups, at most kMaxSimdGroups.
MFS_CONSTANT constexpr int kSimdWidth = 32;
MFS_CONSTANT constexpr int kReadsPerThread = 16;
MFS_CONSTANT constexpr int kMaxSimdGroups = 32; // 1024 threads
MFS_CONSTANT constexpr int kNormIn = kCheckIn;
MFS_CONSTANT constexpr int kNormSlots = kCheckFlag; // float32 a threadgroup
MFS_CONSTANT constexpr int kNormArgs = kCheckArgs;
MFS_CONSTANT constexpr int kNormShape = kCheckShape;
MFS_CONSTANT constexpr int kNormStrides = kCheckStrides;

// Buffer slots of "grad_norm_sum": one threadgroup adds the slots up.
MFS_CONSTANT constexpr int kNormSumSlots = 0;
MFS_CONSTANT constexpr int kNormSumOut = 1;   // the float32 squared norm
MFS_CONSTANT constexpr int kNormSumCount = 2; // int64: the slots written

// Buffer slots of the step-decay kernels.
MFS_CONSTANT constexpr int kStepIn = 0;
MFS_CONSTANT constexpr int kLearningRateOut = 1;
MFS_CONSTANT constexpr int kStepDecayArgs = 2;
MFS_CONSTANT constexpr int kStepShape = 3; // general kernels only
MFS_CONSTANT constexpr int kStepStrides = 4;

// Constants of one SGD launch (64-bit fields first: one layout in C++ and
// Metal).
struct SGDArgs {
  int64_t size;             // elements of the tensor
  int64_t step_size;        // step decay, when scheduled
  uint64_t rounding_seed;   // stochastic rounding: the user's seed
  uint64_t rounding_tensor; // ... and this tensor's index in the update
  float weight_decay;       // float32(weight_decay)
  float momentum;           // float32(momentum)
  float dampening_scale;    // float32(1 - dampening)
  float init;               // float32(init), when scheduled
  float decay_rate;         // float32(decay_rate), when scheduled
  int32_t scheduled; // 1: lr from the step counter; 0: from kLearningRate
  int32_t ndim;      // general kernels: the StridedLayout's axes
  // The run-time options (math::SGDHyper's flags), 0 or 1.
  int32_t has_weight_decay;
  int32_t has_dampening;
  int32_t nesterov;
  int32_t scale_grad; // the gradient is divided by kGradScale first
  int32_t maximize;   // ... negated (with scale_grad)
  int32_t has_skip;   // a nonzero kSkip flag makes the update a copy
  int32_t has_clip;   // ... and multiplied by kClipFactor's clip factor
};

struct CheckArgs {
  int64_t size;
  int64_t first_slot; // the norm: this dispatch's first threadgroup's slot
  int32_t ndim;
};

// The element a gradient-read thread `t` (its index in the grid) reads at
// its step k < kReadsPerThread.
inline int64_t grad_read_index(int64_t t, int k) {
  return (t / kSimdWidth) * (int64_t(kSimdWidth) * kReadsPerThread) +
         int64_t(k) * kSimdWidth + t % kSimdWidth;
}

struct StepDecayArgs {
  int64_t size;
  int64_t step_size;
  float init;
  float decay_rate;
  int32_t ndim;
};

#ifndef __METAL_VERSION__

// Which kernel variant an update needs (decided on the double values, as
// stock's Python branches are) and its float32 constants, each rounded once
// as stock rounds its Python scalars.
struct SGDVariant {
  bool weight_decay;
  bool momentum;
  bool dampening;
  bool nesterov;
  bool scale_grad; // a grad_scale input, or maximize
  bool maximize;
  bool skip; // a skip-flag input (skip_nonfinite): a set flag copies instead
  bool clip; // a clip-factor input (max_grad_norm)
  // How updated params are stored: math::kRoundNearest, kRoundStochastic
  // (with a step input and `seed`) or kMasterWeights (with master inputs).
  int rounding;
  uint64_t seed;
  math::SGDHyper hyper;

  static SGDVariant from(
      double momentum,
      double weight_decay,
      double dampening,
      bool nesterov,
      bool has_grad_scale = false,
      bool maximize = false,
      bool skip = false,
      bool clip = false,
      int rounding = math::kRoundNearest,
      uint64_t seed = 0) {
    SGDVariant v;
    v.weight_decay = weight_decay != 0;
    v.momentum = momentum > 0;
    v.dampening = v.momentum && dampening > 0;
    v.nesterov = v.momentum && nesterov;
    v.scale_grad = has_grad_scale || maximize || clip;
    v.maximize = maximize;
    v.skip = skip;
    v.clip = clip;
    v.rounding = rounding;
    v.seed = rounding == math::kRoundStochastic ? seed : 0;
    v.hyper.weight_decay = static_cast<float>(weight_decay);
    v.hyper.momentum = static_cast<float>(momentum);
    // Stock computes (1 - dampening) on Python floats, then rounds once.
    v.hyper.dampening_scale = static_cast<float>(1.0 - dampening);
    // Set when a launch runs, from the grad_scale read on the device.
    v.hyper.grad_divisor = 1.0f;
    v.hyper.clip_factor = 1.0f;
    v.hyper.has_weight_decay = v.weight_decay;
    v.hyper.has_dampening = v.dampening;
    v.hyper.nesterov = v.nesterov;
    v.hyper.scale_grad = v.scale_grad;
    return v;
  }

  // The divisor of a launch: the loss scale, negated for maximize (exact).
  float grad_divisor(float grad_scale) const {
    return maximize ? -grad_scale : grad_scale;
  }

  bool operator==(const SGDVariant& o) const {
    return weight_decay == o.weight_decay && momentum == o.momentum &&
           dampening == o.dampening && nesterov == o.nesterov &&
           scale_grad == o.scale_grad && maximize == o.maximize &&
           skip == o.skip && clip == o.clip && rounding == o.rounding &&
           seed == o.seed && hyper.weight_decay == o.hyper.weight_decay &&
           hyper.momentum == o.hyper.momentum &&
           hyper.dampening_scale == o.hyper.dampening_scale;
  }
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

// Everything eval_gpu needs to launch one tensor's update.
struct SGDPlan {
  std::string name; // the kernel's host_name
  int64_t threads;
  SGDArgs args;
};

// "sgd_<contiguous|general>_<dtype>_<state dtype>_<M>", M 1 with a momentum
// buffer and 0 without (the state dtype is then the param's), then "_sr"
// (stochastic rounding) or "_mw" (master weights): what changes the types or
// the memory traffic; the other options are SGDArgs' run-time flags.
// kernels/sgd_update.metal instantiates the same names. `tensor_index` is the
// tensor's place in the whole update (it picks the random rounding stream).
inline SGDPlan plan_sgd(
    const std::string& dtype,
    const std::string& state_dtype,
    const StridedLayout* layout, // nullptr: row-contiguous operands
    int64_t size,
    const SGDVariant& v,
    const FusedSchedule& schedule,
    uint64_t tensor_index = 0) {
  const bool contiguous = layout == nullptr;
  SGDPlan plan;
  plan.name = contiguous ? "sgd_contiguous_" : "sgd_general_";
  plan.name += dtype + "_" + (v.momentum ? state_dtype : dtype) + "_";
  plan.name += v.momentum ? '1' : '0';
  if (v.rounding == math::kRoundStochastic) {
    plan.name += "_sr";
  } else if (v.rounding == math::kMasterWeights) {
    plan.name += "_mw";
  }
  // General kernels: a thread per column and kRowsPerThread rows.
  plan.threads =
      contiguous ? (size + kWorkPerThread - 1) / kWorkPerThread
                 : layout->outer_size() * layout->cols() *
                       ((layout->rows() + kRowsPerThread - 1) / kRowsPerThread);
  plan.args.size = size;
  plan.args.step_size = schedule.enabled ? schedule.step_size : 1;
  plan.args.rounding_seed = v.seed;
  plan.args.rounding_tensor = tensor_index;
  plan.args.weight_decay = v.hyper.weight_decay;
  plan.args.momentum = v.hyper.momentum;
  plan.args.dampening_scale = v.hyper.dampening_scale;
  plan.args.init = static_cast<float>(schedule.init);
  plan.args.decay_rate = static_cast<float>(schedule.decay_rate);
  plan.args.scheduled = schedule.enabled ? 1 : 0;
  plan.args.ndim = contiguous ? 0 : layout->ndim();
  plan.args.has_weight_decay = v.weight_decay ? 1 : 0;
  plan.args.has_dampening = v.dampening ? 1 : 0;
  plan.args.nesterov = v.nesterov ? 1 : 0;
  plan.args.scale_grad = v.scale_grad ? 1 : 0;
  plan.args.maximize = v.maximize ? 1 : 0;
  plan.args.has_skip = v.skip ? 1 : 0;
  plan.args.has_clip = v.clip ? 1 : 0;
  return plan;
}

struct StepDecayPlan {
  std::string name; // the kernel's host_name
  int64_t threads;
  StepDecayArgs args;
};

inline StepDecayPlan plan_step_decay(
    const std::string& dtype,
    bool contiguous,
    int64_t size,
    int ndim,
    double init,
    double decay_rate,
    int64_t step_size) {
  StepDecayPlan plan;
  plan.name =
      std::string(
          contiguous ? "step_decay_contiguous_" : "step_decay_general_") +
      dtype;
  plan.threads = size;
  plan.args.size = size;
  plan.args.step_size = step_size;
  plan.args.init = static_cast<float>(init);
  plan.args.decay_rate = static_cast<float>(decay_rate);
  plan.args.ndim = ndim;
  return plan;
}

struct CheckPlan {
  std::string name; // the kernel's host_name
  int64_t threads;
  CheckArgs args;
};

// The gradient reads before an update, one kernel family each, the same
// launch layout for both: "grad_check_<contiguous|general>_<dtype>" ORs a
// uint32 flag (cleared first by kGradCheckClear), "grad_norm_..." writes
// each threadgroup's sum of squares to its slot (added up by kGradNormSum).
enum class GradRead { check, norm };

inline const char* grad_read_prefix(GradRead kind) {
  return kind == GradRead::check ? "grad_check_" : "grad_norm_";
}

inline constexpr const char* kGradCheckClear = "grad_check_clear";
inline constexpr const char* kGradNormSum = "grad_norm_sum";

inline CheckPlan plan_grad_read(
    GradRead kind,
    const std::string& dtype,
    bool contiguous,
    int64_t size,
    int ndim) {
  CheckPlan plan;
  plan.name = std::string(grad_read_prefix(kind)) +
              (contiguous ? "contiguous_" : "general_") + dtype;
  // Whole SIMD groups (threadgroups are multiples of kSimdWidth).
  const int64_t per_group = int64_t(kSimdWidth) * kReadsPerThread;
  plan.threads = (size + per_group - 1) / per_group * kSimdWidth;
  plan.args.size = size;
  plan.args.first_slot = 0;
  plan.args.ndim = ndim;
  return plan;
}

// A 1-D launch of `threads` threads as a 2-D grid (x * y >= threads, each
// below 2^32) so that more than 2^32 threads index correctly; the kernels
// return early past the end.
struct Grid {
  uint64_t x;
  uint64_t y;
  uint64_t group;
};

inline Grid make_grid(int64_t threads, uint64_t max_group) {
  const uint64_t t = threads > 0 ? static_cast<uint64_t>(threads) : 1;
  const uint64_t limit = uint64_t(1) << 31;
  Grid g;
  g.x = t < limit ? t : limit;
  g.y = (t + g.x - 1) / g.x;
  g.group = max_group < g.x ? max_group : g.x;
  return g;
}

// The threadgroups of a grid (the last of a row may be partial).
inline int64_t threadgroups(const Grid& g) {
  return static_cast<int64_t>((g.x + g.group - 1) / g.group * g.y);
}

#endif

} // namespace launch
} // namespace mlx_fused_sgd
