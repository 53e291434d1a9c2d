// SGDUpdate on a Metal GPU (kernels/sgd_update.metal).
#include "mlx/backend/metal/device.h"

#include "utils.h"

#include "common/sgd_update.h"
#include "kernels/metal_launch.h"
#include "sgd_update.h"

namespace mlx_fused_sgd {

void SGDUpdate::eval_gpu(
    const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  check_layout(inputs, outputs);
  release_sibling_inputs(inputs, outputs);
  const int n = num_tensors_;
  const bool momentum = variant_.momentum;
  const bool master = master_weights();
  auto& s = stream();
  auto& d = mx::metal::device(s.device);
  auto* lib = d.get_library(kMetalLibraryName, extension_dir());
  auto& encoder = mx::metal::get_command_encoder(s);
  const auto scalars = scalar_inputs(inputs);
  const launch::FusedSchedule fused = fused_schedule();

  for (int i = 0; i < n; ++i) {
    auto [p, g, v, p_out, v_out, m, m_out] =
        tensor_slots(inputs, outputs, n, i, momentum, master);
    allocate_outputs(p, g, v, p_out, v_out);
    allocate_master(m, m_out);
    if (p.size() == 0) {
      continue;
    }
    const bool contiguous = all_row_contiguous(p, g, v, m);
    std::optional<launch::StridedLayout> layout;
    if (!contiguous) {
      layout = strided_layout(p, g, v, m);
    }
    auto plan = launch::plan_sgd(
        dtype_name(p.dtype()),
        dtype_name(momentum ? v->dtype() : p.dtype()),
        layout ? &*layout : nullptr,
        static_cast<int64_t>(p.size()),
        variant_,
        fused,
        tensor_id(i));
    auto* kernel = d.get_kernel(plan.name, lib);
    encoder.set_compute_pipeline_state(kernel);
    encoder.set_input_array(p, launch::kParam);
    encoder.set_input_array(g, launch::kGrad);
    // Momentum off: the velocity slots get valid buffers the kernel ignores;
    // likewise the master slots without master weights.
    encoder.set_input_array(momentum ? *v : g, launch::kVelocity);
    encoder.set_output_array(p_out, launch::kParamOut);
    encoder.set_output_array(momentum ? *v_out : p_out, launch::kVelocityOut);
    encoder.set_input_array(scalars.lr, launch::kLearningRate);
    encoder.set_input_array(scalars.lr, launch::kStep);
    encoder.set_bytes(plan.args, launch::kSGDArgs);
    encoder.set_input_array(scalars.grad_scale, launch::kGradScale);
    encoder.set_input_array(scalars.skip, launch::kSkip);
    encoder.set_input_array(scalars.clip, launch::kClipFactor);
    encoder.set_input_array(master ? *m : p, launch::kMaster);
    encoder.set_output_array(master ? *m_out : p_out, launch::kMasterOut);
    encoder.set_input_array(scalars.rounding_step, launch::kRoundingStep);
    if (layout) {
      // Absent operands have the outputs' strides (never read).
      const auto& st = layout->strides;
      encoder.set_vector_bytes(layout->shape, launch::kShape);
      encoder.set_vector_bytes(st[launch::kLayoutParam], launch::kParamStrides);
      encoder.set_vector_bytes(st[launch::kLayoutGrad], launch::kGradStrides);
      encoder.set_vector_bytes(
          st[launch::kLayoutVelocity], launch::kVelocityStrides);
      encoder.set_vector_bytes(
          st[launch::kLayoutMaster], launch::kMasterStrides);
      encoder.set_vector_bytes(st[launch::kLayoutOut], launch::kOutStrides);
    }
    auto grid = launch::make_grid(
        plan.threads, kernel->maxTotalThreadsPerThreadgroup());
    encoder.dispatch_threads(
        MTL::Size(grid.x, grid.y, 1), MTL::Size(grid.group, 1, 1));
  }
}

} // namespace mlx_fused_sgd
