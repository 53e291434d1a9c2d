// GradCheck on a Metal GPU (kernels/grad_check.metal).
#include <algorithm>

#include "utils.h"
#if MFS_METAL_KERNELS
#include "mlx/backend/metal/device.h"
#endif

#include "grad_check.h"
#include "kernels/sgd_launch.h"

namespace mlx_fused_sgd {

#if MFS_METAL_KERNELS

void GradCheck::eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) {
  allocate(out);
  auto& s = stream();
  auto& d = mx::metal::device(s.device);
  auto* lib = d.get_library(kMetalLibraryName, extension_dir());
  auto& encoder = mx::metal::get_command_encoder(s);

  const auto read = kind_ == Kind::nonfinite ? launch::GradRead::check
                                             : launch::GradRead::norm;
  auto* clear = d.get_kernel(launch::grad_read_clear_name(read), lib);
  encoder.set_compute_pipeline_state(clear);
  encoder.set_output_array(out, launch::kCheckFlag);
  encoder.dispatch_threads(MTL::Size(1, 1, 1), MTL::Size(1, 1, 1));

  for (const auto& g : inputs) {
    if (g.size() == 0) {
      continue;
    }
    const bool contiguous = reads_as_block(g);
    auto plan = launch::plan_grad_read(
        read,
        dtype_name(g.dtype()),
        contiguous,
        static_cast<int64_t>(g.size()),
        g.ndim());
    auto* kernel = d.get_kernel(plan.name, lib);
    encoder.set_compute_pipeline_state(kernel);
    encoder.set_input_array(g, launch::kCheckIn);
    encoder.set_output_array(out, launch::kCheckFlag);
    encoder.set_bytes(plan.args, launch::kCheckArgs);
    if (!contiguous) {
      encoder.set_vector_bytes(g.shape(), launch::kCheckShape);
      encoder.set_vector_bytes(g.strides(), launch::kCheckStrides);
    }
    // Threadgroups of whole SIMD groups, at most kMaxSimdGroups (the
    // kernels' threadgroup reduction has a slot per SIMD group).
    const uint64_t group_limit =
        std::min<uint64_t>(
            kernel->maxTotalThreadsPerThreadgroup() / launch::kSimdWidth,
            launch::kMaxSimdGroups) *
        launch::kSimdWidth;
    auto grid = launch::make_grid(plan.threads, group_limit);
    encoder.dispatch_threads(
        MTL::Size(grid.x, grid.y, 1), MTL::Size(grid.group, 1, 1));
  }
}

#else

void GradCheck::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  // grads_nonfinite composes stock ops on a GPU stream in builds without
  // Metal kernels, so only a hand-built graph reaches this.
  throw std::runtime_error(
      "mlx_fused_sgd: GradCheck has no GPU kernel in this build (no Metal "
      "kernels); use grads_nonfinite, which falls back to stock MLX ops.");
}

#endif

} // namespace mlx_fused_sgd
