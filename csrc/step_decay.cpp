#include "step_decay.h"

#include <cmath>
#include <limits>
#include <sstream>
#include <stdexcept>

#include "utils.h"

namespace mlx_fused_sgd {

void StepDecay::validate() const {
  if (step_size < 1) {
    std::ostringstream os;
    os << "step_size must be greater than 0, but got " << step_size << ".";
    throw std::invalid_argument(os.str());
  }
  if (!std::isfinite(init)) {
    std::ostringstream os;
    os << "init must be a finite number, but got " << init << ".";
    throw std::invalid_argument(os.str());
  }
  if (!std::isfinite(decay_rate)) {
    std::ostringstream os;
    os << "decay_rate must be a finite number, but got " << decay_rate << ".";
    throw std::invalid_argument(os.str());
  }
}

void check_step_array(
    const mx::array& step, int64_t step_size, const char* what) {
  if (!mx::issubdtype(step.dtype(), mx::integer)) {
    throw std::invalid_argument(
        std::string(what) + " must be an integer array (the step counter), " +
        "got dtype " + dtype_name(step.dtype()) + ".");
  }
  dispatch_integer(step.dtype(), [&](auto zero) {
    using I = decltype(zero);
    if (static_cast<uint64_t>(step_size) >
        static_cast<uint64_t>(std::numeric_limits<I>::max())) {
      std::ostringstream os;
      os << "step_size " << step_size << " does not fit in the " << what
         << " dtype " << dtype_name(step.dtype())
         << "; use a wider integer step (stock MLX raises here too).";
      throw std::invalid_argument(os.str());
    }
  });
}

mx::array step_decay_lr(
    const mx::array& step,
    double init,
    double decay_rate,
    int64_t step_size,
    mx::StreamOrDevice s) {
  StepDecay schedule{init, decay_rate, step_size};
  schedule.validate();
  check_step_array(step, step_size, "step");
  auto stream = mx::to_stream(s);
  if (!has_fused_kernel(stream)) {
    return step_decay_lr_composed(step, schedule, stream);
  }
  return mx::array(
      step.shape(),
      mx::float32,
      std::make_shared<StepDecayLR>(stream, schedule),
      {step});
}

mx::array step_decay_lr_composed(
    const mx::array& step, const StepDecay& schedule, mx::StreamOrDevice s) {
  // Stock's own expression: init * decay_rate ** (step // step_size).
  auto quotient =
      mx::floor_divide(step, mx::array(schedule.step_size, step.dtype()), s);
  auto factor = mx::power(
      mx::array(static_cast<float>(schedule.decay_rate)),
      mx::astype(quotient, mx::float32, s),
      s);
  return mx::multiply(mx::array(static_cast<float>(schedule.init)), factor, s);
}

// Elementwise, so the batched op is the op on the batched input.
std::pair<std::vector<mx::array>, std::vector<int>> StepDecayLR::vmap(
    const std::vector<mx::array>& inputs, const std::vector<int>& axes) {
  return {
      {step_decay_lr(
          inputs[0],
          schedule_.init,
          schedule_.decay_rate,
          schedule_.step_size,
          stream())},
      axes};
}

bool StepDecayLR::is_equivalent(const mx::Primitive& other) const {
  return schedule_ == static_cast<const StepDecayLR&>(other).schedule_;
}

std::vector<mx::Shape>
StepDecayLR::output_shapes(const std::vector<mx::array>& inputs) {
  return {inputs[0].shape()};
}

} // namespace mlx_fused_sgd
