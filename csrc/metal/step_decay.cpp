// StepDecayLR on a Metal GPU (kernels/step_decay.metal).
#include "mlx/backend/metal/device.h"

#include "utils.h"

#include "kernels/metal_launch.h"
#include "step_decay.h"

namespace mlx_fused_sgd {

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

} // namespace mlx_fused_sgd
