// The fused SGD update as an MLX primitive: param, grad and momentum buffer in,
// new param and new momentum buffer out, one pass over memory. One primitive
// updates a chunk of tensors of one dtype (Apex-style multi-tensor apply); the
// single-tensor op is a chunk of one.
#pragma once

#include <optional>
#include <vector>

#include "mlx/ops.h"
#include "mlx/primitives.h"

#include "kernels/sgd_plan.h"
#include "step_decay.h"

namespace mlx_fused_sgd {

namespace mx = mlx::core;

// The device inputs and storage options of an update, one line each,
// X(C++ type, name), each empty by default. With the math's options
// (MFS_SGD_OPTIONS in kernels/sgd_math.h) they make SGDSettings, and its
// Python attributes (csrc/bindings.cpp) are made from both lists.
//   grad_scale:    the loss scale; the gradient is divided by it first.
//   skip:          a device flag (grads_nonfinite); nonzero keeps params and
//                  momentum buffers as they are.
//   clip_factor:   a float32 scalar every gradient is multiplied by after
//                  unscaling (max_grad_norm's, computed on the device).
//   master_params: empty, or one entry per param; a float32 copy of a
//                  float16/bfloat16 param is read and updated in its place,
//                  and the param written as its rounding (other entries
//                  empty).
//   rounding_seed, rounding_step: stochastic rounding of bfloat16 params
//                  (those without a master copy): the seed, and the integer
//                  step counter the random bits derive from.
#define MFS_SGD_INPUTS(X)                                                     \
  X(std::optional<mx::array>, grad_scale)                                     \
  X(std::optional<mx::array>, skip)                                           \
  X(std::optional<mx::array>, clip_factor)                                    \
  X(std::vector<std::optional<mx::array>>, master_params)                     \
  X(std::optional<uint64_t>, rounding_seed)                                   \
  X(std::optional<mx::array>, rounding_step)

// Every option of an update: the hyperparameters as the user gave them
// (Python floats) and the device inputs.
struct SGDSettings : math::SGDOptions {
#define MFS_INPUT_FIELD(type, name) type name{};
  MFS_SGD_INPUTS(MFS_INPUT_FIELD)
#undef MFS_INPUT_FIELD

  // Throws std::invalid_argument naming the bad hyperparameter.
  void validate() const;

  // Which device inputs the kernels read.
  launch::SGDInputs inputs() const {
    return {
        grad_scale.has_value(), skip.has_value(), clip_factor.has_value()};
  }
};

using launch::SGDVariant;

struct SGDResult {
  std::vector<mx::array> params;
  // New momentum buffers; the given ones unchanged (or empty) when momentum
  // is off.
  std::vector<mx::array> velocities;
  // New master copies where master_params had one (empty entries elsewhere,
  // and no entries without master_params).
  std::vector<std::optional<mx::array>> master_params;
};

// Default number of tensors per primitive. MLX gives every output of a
// primitive its own copy of the input list and of its siblings, so a chunk of
// k tensors costs O(k^2) to build and tear down, while every primitive costs
// a fixed overhead. Measured with benchmarks/studies/chunk_sweep.py (2-core
// Linux): 4 is best for 1000 small tensors (5.9 ms vs 6.4 at 8, 7.2 at 1,
// 10.7 at 32) and within noise of the best for the large and gpt workloads.
inline constexpr int kDefaultTensorsPerPrimitive = 4;
// The most: a primitive of k tensors costs O(k^2) memory and time to build
// (4000 tiny tensors in one primitive measured 8.6 s and 2.5 GB).
inline constexpr int kMaxTensorsPerPrimitive = 256;

// The learning rate of an update: a float32 scalar array, or (with
// `schedule`) the optimizer's integer step counter, from which the kernels
// compute the step-decay learning rate themselves (no extra op).
struct LearningRate {
  mx::array value;
  std::optional<StepDecay> schedule;
};

// The fused update of many tensors: grouped by dtype and chunked into
// primitives of `tensors_per_primitive` tensors each. On a device without a
// kernel of this package (a GPU in an MLX build without Metal), or with
// use_fallback, the update is composed of stock MLX ops with the same
// semantics instead.
SGDResult sgd_update(
    const std::vector<mx::array>& params,
    const std::vector<mx::array>& grads,
    const std::vector<mx::array>& velocities,
    const LearningRate& learning_rate,
    const SGDSettings& settings,
    int tensors_per_primitive = kDefaultTensorsPerPrimitive,
    mx::StreamOrDevice s = {},
    bool use_fallback = false);

// Inputs:  params[n], grads[n], velocities[n] (momentum only), then one
//          scalar: the float32 learning rate, or the uint64 step counter when
//          a step-decay schedule is fused in; then, with grad_scale or
//          maximize, the float32 grad_scale scalar (1 if not given); then,
//          with a skip flag, the uint32 flag; then, with clipping, the
//          float32 clip factor; then, with stochastic rounding, the uint64
//          rounding step. With master weights, masters[n] (float32) follow
//          the velocities.
// Outputs: params[n], velocities[n] (momentum only), masters[n] (master
//          weights only).
class SGDUpdate : public mx::Primitive {
 public:
  SGDUpdate(
      mx::Stream stream,
      int num_tensors,
      SGDVariant variant,
      std::optional<StepDecay> schedule,
      std::vector<uint64_t> tensor_ids = {})
      : mx::Primitive(stream), num_tensors_(num_tensors), variant_(variant),
        schedule_(schedule), tensor_ids_(std::move(tensor_ids)) {}

  void eval_cpu(
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs) override;
  void eval_gpu(
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs) override;


  const char* name() const override {
    return "SGDUpdate";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape>
  output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  void check_layout(
      const std::vector<mx::array>& inputs,
      const std::vector<mx::array>& outputs) const;
  bool master_weights() const {
    return variant_.rounding == math::kMasterWeights;
  }
  bool stochastic_rounding() const {
    return variant_.rounding == math::kRoundStochastic;
  }
  // Tensor inputs and outputs per tensor.
  size_t inputs_per_tensor() const {
    return 2 + variant_.momentum + master_weights();
  }
  size_t outputs_per_tensor() const {
    return 1 + variant_.momentum + master_weights();
  }
  // Indices of the scalar inputs that follow the tensors.
  size_t lr_index() const {
    return inputs_per_tensor() * num_tensors_;
  }
  size_t scale_index() const {
    return lr_index() + 1;
  }
  size_t skip_index() const {
    return scale_index() + variant_.scale_grad();
  }
  size_t clip_index() const {
    return skip_index() + variant_.skip;
  }
  size_t rounding_step_index() const {
    return clip_index() + variant_.clip;
  }
  // The scalar inputs of a GPU launch; those the variant has no input for
  // are the learning rate's, a valid buffer the kernels ignore. With a
  // schedule the learning-rate input is the uint64 step counter.
  struct ScalarInputs {
    const mx::array& lr;
    const mx::array& grad_scale;
    const mx::array& skip;
    const mx::array& clip;
    const mx::array& rounding_step;
  };
  ScalarInputs scalar_inputs(const std::vector<mx::array>& inputs) const {
    const auto& lr = inputs[lr_index()];
    return {
        lr,
        variant_.scale_grad() ? inputs[scale_index()] : lr,
        variant_.skip ? inputs[skip_index()] : lr,
        variant_.clip ? inputs[clip_index()] : lr,
        stochastic_rounding() ? inputs[rounding_step_index()] : lr};
  }
  launch::FusedSchedule fused_schedule() const {
    return {
        schedule_.has_value(),
        schedule_ ? schedule_->init : 0.0,
        schedule_ ? schedule_->decay_rate : 0.0,
        schedule_ ? schedule_->step_size : 1};
  }
  // The index of chunk tensor i in the whole update (stochastic rounding:
  // it picks the tensor's random stream).
  uint64_t tensor_id(int i) const {
    return tensor_ids_.empty() ? 0 : tensor_ids_[i];
  }

  int num_tensors_;
  SGDVariant variant_;
  std::optional<StepDecay> schedule_;
  std::vector<uint64_t> tensor_ids_; // stochastic rounding only
};

} // namespace mlx_fused_sgd
