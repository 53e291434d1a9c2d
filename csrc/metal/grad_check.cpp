// GradCheck on a Metal GPU (kernels/grad_check.metal).
#include <algorithm>
#include <string>
#include <vector>

#include "mlx/backend/metal/device.h"

#include "utils.h"

#include "grad_check.h"
#include "kernels/metal_launch.h"

namespace mlx_fused_sgd {

namespace {

// The widest threadgroup a reduction kernel takes: whole SIMD groups, at most
// kMaxSimdGroups (its threadgroup reduction has a slot per SIMD group), and
// no more than the pipeline allows.
uint64_t reduction_group(MTL::ComputePipelineState* kernel) {
  return std::min<uint64_t>(
             kernel->maxTotalThreadsPerThreadgroup() / launch::kSimdWidth,
             launch::kMaxSimdGroups) *
         launch::kSimdWidth;
}

} // namespace

void GradCheck::eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) {
  allocate(out);
  auto& s = stream();
  auto& d = mx::metal::device(s.device);
  auto* lib = d.get_library(kMetalLibraryName, extension_dir());
  auto& encoder = mx::metal::get_command_encoder(s);

  const auto read = kind_ == Kind::nonfinite ? launch::GradRead::check
                                             : launch::GradRead::norm;
  const bool norm = read == launch::GradRead::norm;

  // Every dispatch, planned first: the norm's slots (one a threadgroup) are
  // allocated before any dispatch is encoded.
  struct Dispatch {
    const mx::array* grad;
    bool contiguous;
    launch::CheckPlan plan;
    MTL::ComputePipelineState* kernel;
    launch::Grid grid;
  };
  std::vector<Dispatch> dispatches;
  int64_t slot_count = 0;
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
    auto grid = launch::make_grid(plan.threads, reduction_group(kernel));
    plan.args.first_slot = slot_count;
    slot_count += launch::threadgroups(grid);
    dispatches.push_back({&g, contiguous, plan, kernel, grid});
  }

  // The check ORs into `out` (cleared first); the norm's threadgroups write
  // slots of a temporary buffer, then grad_norm_sum adds them up into `out`.
  mx::array result = out;
  const int slot_in = norm ? launch::kNormSlots : launch::kCheckFlag;
  if (norm) {
    result = allocate_norm_slots(slot_count, "Metal");
    encoder.add_temporary(result);
  } else {
    encoder.set_compute_pipeline_state(
        d.get_kernel(launch::kGradCheckClear, lib));
    encoder.set_output_array(out, launch::kCheckFlag);
    encoder.dispatch_threads(MTL::Size(1, 1, 1), MTL::Size(1, 1, 1));
  }

  for (const auto& [g, contiguous, plan, kernel, grid] : dispatches) {
    encoder.set_compute_pipeline_state(kernel);
    encoder.set_input_array(*g, launch::kCheckIn);
    encoder.set_output_array(result, slot_in);
    encoder.set_bytes(plan.args, launch::kCheckArgs);
    if (!contiguous) {
      encoder.set_vector_bytes(g->shape(), launch::kCheckShape);
      encoder.set_vector_bytes(g->strides(), launch::kCheckStrides);
    }
    encoder.dispatch_threads(
        MTL::Size(grid.x, grid.y, 1), MTL::Size(grid.group, 1, 1));
  }

  if (norm) {
    auto* sum = d.get_kernel(launch::kGradNormSum, lib);
    // One threadgroup, as wide as it can be: the order the slots are added
    // in is fixed for a device.
    const uint64_t group = reduction_group(sum);
    encoder.set_compute_pipeline_state(sum);
    encoder.set_input_array(result, launch::kNormSumSlots);
    encoder.set_output_array(out, launch::kNormSumOut);
    encoder.set_bytes(slot_count, launch::kNormSumCount);
    encoder.dispatch_threads(MTL::Size(group, 1, 1), MTL::Size(group, 1, 1));
  }
}

} // namespace mlx_fused_sgd
