// StepDecayLR on an NVIDIA GPU through MLX's CUDA backend
// (kernels/step_decay.cuh).
#include "mlx/backend/cuda/device.h"
#include "mlx/backend/cuda/utils.h"

#include "cuda/launch.h"
#include "kernels/step_decay.cuh"
#include "step_decay.h"
#include "utils.h"

namespace mlx_fused_sgd {

void StepDecayLR::eval_gpu(
    const std::vector<mx::array>& inputs, mx::array& out) {
  const auto& step = inputs[0];
  allocate(out);
  if (out.size() == 0) {
    return;
  }
  auto& encoder = mx::cu::get_command_encoder(stream());
  const bool contiguous = step.flags().row_contiguous;
  // Not const: MLX's encoder takes each argument's address as void*.
  auto args = launch::step_decay_args(
      static_cast<int64_t>(out.size()),
      step.ndim(),
      schedule_.init,
      schedule_.decay_rate,
      schedule_.step_size);
  cuda_launch::ReadShape shape{};
  if (!contiguous &&
      !cuda_launch::to_read_shape(step.shape(), step.strides(), shape)) {
    throw std::runtime_error(
        "mlx_fused_sgd: a step array of more than " +
        std::to_string(cuda_launch::kMaxDims) + " axes on CUDA.");
  }
  dispatch_integer(step.dtype(), [&](auto zero) {
    using I = decltype(zero);
    cuda::add_kernel(
        encoder,
        cuda::LaunchArrays().reads(step).writes(out),
        cuda_kernels::step_decay<I>,
        cuda::grid(cuda_launch::blocks_for(args.size)),
        dim3(cuda_launch::kThreads),
        const_cast<I*>(mx::gpu_ptr<I>(step)),
        mx::gpu_ptr<float>(out),
        args,
        shape);
  });
}

} // namespace mlx_fused_sgd
