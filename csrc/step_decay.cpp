#include "step_decay.h"

#include <cmath>
#include <limits>
#include <sstream>
#include <stdexcept>

#include "mlx/backend/cpu/encoder.h"
#ifdef _METAL_
#include "mlx/backend/metal/device.h"
#endif

#include "kernels/sgd_launch.h"
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

namespace {

// Calls f(I{}) with I the C++ integer type of `dtype`.
template <typename F> void dispatch_integer(mx::Dtype dtype, F&& f) {
  switch (dtype) {
  case mx::int8:
    return f(int8_t{});
  case mx::int16:
    return f(int16_t{});
  case mx::int32:
    return f(int32_t{});
  case mx::int64:
    return f(int64_t{});
  case mx::uint8:
    return f(uint8_t{});
  case mx::uint16:
    return f(uint16_t{});
  case mx::uint32:
    return f(uint32_t{});
  case mx::uint64:
    return f(uint64_t{});
  default:
    throw std::invalid_argument(
        "step must be an integer array, got dtype " + dtype_name(dtype) + ".");
  }
}

} // namespace

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

void StepDecayLR::eval_cpu(
    const std::vector<mx::array>& inputs, mx::array& out) {
  const auto& step = inputs[0];
  allocate(out);

  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.set_input_array(step);
  encoder.set_output_array(out);

  const float init = static_cast<float>(schedule_.init);
  const float decay_rate = static_cast<float>(schedule_.decay_rate);
  dispatch_integer(step.dtype(), [&](auto zero) {
    using I = decltype(zero);
    encoder.dispatch([step_ptr = step.data<I>(),
                      out_ptr = out.data<float>(),
                      size = static_cast<int64_t>(out.size()),
                      contiguous = step.flags().row_contiguous,
                      shape = step.shape(),
                      strides = step.strides(),
                      step_size = static_cast<I>(schedule_.step_size),
                      init,
                      decay_rate]() {
      for (int64_t i = 0; i < size; ++i) {
        int64_t loc = contiguous ? i : elem_to_loc(i, shape, strides);
        out_ptr[i] =
            math::step_decay_lr<I>(step_ptr[loc], step_size, init, decay_rate);
      }
    });
  });
}

#if MFS_METAL_KERNELS

void StepDecayLR::eval_gpu(
    const std::vector<mx::array>& inputs, mx::array& out) {
  const auto& step = inputs[0];
  allocate(out);
  if (out.size() == 0) {
    return;
  }
  auto& s = stream();
  auto& d = mx::metal::device(s.device);
  const bool contiguous = step.flags().row_contiguous;
  auto plan = launch::plan_step_decay(
      dtype_name(step.dtype()),
      contiguous,
      static_cast<int64_t>(out.size()),
      step.ndim(),
      schedule_.init,
      schedule_.decay_rate,
      schedule_.step_size);
  auto* kernel = d.get_kernel(
      plan.name, d.get_library(kMetalLibraryName, extension_dir()));
  auto& encoder = mx::metal::get_command_encoder(s);
  encoder.set_compute_pipeline_state(kernel);
  encoder.set_input_array(step, launch::kStepIn);
  encoder.set_output_array(out, launch::kLearningRateOut);
  encoder.set_bytes(plan.args, launch::kStepDecayArgs);
  if (!contiguous) {
    encoder.set_vector_bytes(step.shape(), launch::kStepShape);
    encoder.set_vector_bytes(step.strides(), launch::kStepStrides);
  }
  auto grid =
      launch::make_grid(plan.threads, kernel->maxTotalThreadsPerThreadgroup());
  encoder.dispatch_threads(
      MTL::Size(grid.x, grid.y, 1), MTL::Size(grid.group, 1, 1));
}

#else

void StepDecayLR::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  // The op routes GPU streams to the composed fallback in builds without
  // Metal kernels, so only a hand-built graph reaches this.
  throw std::runtime_error(
      "mlx_fused_sgd: StepDecayLR has no GPU kernel in this build (MLX "
      "without Metal); use step_decay_lr, which falls back to stock MLX ops.");
}

#endif

std::vector<mx::array> StepDecayLR::jvp(
    const std::vector<mx::array>&,
    const std::vector<mx::array>&,
    const std::vector<int>&) {
  throw std::runtime_error(
      "mlx_fused_sgd: StepDecayLR (a learning-rate schedule of an integer "
      "step) cannot be differentiated.");
}

std::vector<mx::array> StepDecayLR::vjp(
    const std::vector<mx::array>&,
    const std::vector<mx::array>&,
    const std::vector<int>&,
    const std::vector<mx::array>&) {
  throw std::runtime_error(
      "mlx_fused_sgd: StepDecayLR (a learning-rate schedule of an integer "
      "step) cannot be differentiated.");
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
