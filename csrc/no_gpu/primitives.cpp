// eval_gpu of every primitive in a build without GPU kernels (MLX without
// Metal or CUDA, or a Mac without the Metal compiler), as MLX's own
// backend/no_gpu: the ops route GPU streams to the composed fallback (stock
// MLX ops), so only a hand-built graph reaches these.
#include <stdexcept>

#include "grad_check.h"
#include "sgd_update.h"
#include "step_decay.h"

namespace mlx_fused_sgd {

void GradCheck::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error(
      "mlx_fused_sgd: GradCheck has no GPU kernel in this build (no Metal "
      "kernels); use grads_nonfinite, which falls back to stock MLX ops.");
}

void SGDUpdate::eval_gpu(
    const std::vector<mx::array>&, std::vector<mx::array>&) {
  throw std::runtime_error(
      "mlx_fused_sgd: SGDUpdate has no GPU kernel in this build (no Metal "
      "kernels); use the op functions, which fall back to stock MLX ops.");
}

void StepDecayLR::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  throw std::runtime_error(
      "mlx_fused_sgd: StepDecayLR has no GPU kernel in this build (MLX "
      "without Metal); use step_decay_lr, which falls back to stock MLX ops.");
}

} // namespace mlx_fused_sgd
