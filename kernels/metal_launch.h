// How the Metal kernels are launched: buffer slots, kernel names and the
// grid (the launch constants and the rest of the plan every backend shares
// are kernels/sgd_plan.h). Shared by eval_gpu (csrc/metal/) and by the Linux
// test harness that runs the kernels on the CPU (tests/metal_harness.cpp), so
// the harness cannot drift from what eval_gpu binds.
#pragma once

#ifndef __METAL_VERSION__
#include <string>
#endif

#include "kernels/sgd_plan.h"

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
MFS_CONSTANT constexpr int kGradScale = 12; // float32 (args.hyper.scale_grad)
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

#ifndef __METAL_VERSION__

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
  plan.args = sgd_args(
      v, schedule, size, contiguous ? 0 : layout->ndim(), tensor_index);
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
  plan.args = step_decay_args(size, ndim, init, decay_rate, step_size);
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
