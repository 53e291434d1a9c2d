// GradCheck (the non-finite check and the squared norm) on an NVIDIA GPU
// through MLX's CUDA backend (kernels/grad_check.cuh). Gradients that are one
// dense block are read in multi-tensor launches, the others one launch each.
// The check clears its flag first and every block that sees a NaN or an Inf
// ORs it; for the norm every block writes its sum to a slot of its own in a
// temporary buffer, and one block adds the slots up in a fixed order.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "mlx/backend/cuda/device.h"
#include "mlx/backend/cuda/utils.h"

#include "cuda/launch.h"
#include "grad_check.h"
#include "kernels/grad_check.cuh"
#include "utils.h"

namespace mlx_fused_sgd {

namespace {

// Reads `grads` into `result`: the check's flag, or the norm's slots from
// `next_slot` on (advanced past the launches' blocks).
template <typename T, bool kNorm>
void read_gradients(
    mx::cu::CommandEncoder& encoder,
    const std::vector<mx::array>& grads,
    const mx::array& result,
    int64_t& next_slot) {
  void* result_ptr = mx::gpu_ptr<void>(result);
  std::vector<const void*> flat;
  std::vector<int64_t> flat_sizes;
  std::vector<const mx::array*> flat_grads;
  for (const auto& g : grads) {
    if (g.size() == 0) {
      continue;
    }
    if (reads_as_block(g)) {
      flat.push_back(mx::gpu_ptr<void>(g));
      flat_sizes.push_back(static_cast<int64_t>(g.size()));
      flat_grads.push_back(&g);
      continue;
    }
    cuda_launch::ReadShape shape{};
    if (!cuda_launch::to_read_shape(g.shape(), g.strides(), shape)) {
      throw std::runtime_error(
          "mlx_fused_sgd: a gradient of more than " +
          std::to_string(cuda_launch::kMaxDims) + " axes on CUDA.");
    }
    auto size = static_cast<int64_t>(g.size());
    const int64_t blocks = cuda_launch::chunks(size);
    cuda::add_kernel(
        encoder,
        cuda::LaunchArrays().reads(g).writes(result),
        cuda_kernels::grad_read_strided<T, kNorm>,
        cuda::grid(blocks),
        dim3(cuda_launch::kThreads),
        static_cast<T*>(mx::gpu_ptr<void>(g)),
        size,
        shape,
        result_ptr,
        next_slot);
    next_slot += blocks;
  }
  for (const auto& span : cuda_launch::split_tables(flat_sizes)) {
    if (span.blocks() == 0) {
      continue;
    }
    cuda::LaunchArrays arrays;
    for (int k = 0; k < span.count; ++k) {
      arrays.reads(*flat_grads[span.first + k]);
    }
    cuda::add_kernel(
        encoder,
        arrays.writes(result),
        cuda_kernels::grad_read_multi_tensor<T, kNorm>,
        cuda::grid(span.blocks()),
        dim3(cuda_launch::kThreads),
        cuda_launch::make_read_table(span, flat, flat_sizes),
        result_ptr,
        next_slot);
    next_slot += span.blocks();
  }
}

} // namespace

void GradCheck::eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) {
  allocate(out);
  auto& encoder = mx::cu::get_command_encoder(stream());
  const bool norm = kind_ == Kind::sq_norm;
  // The check ORs into `out`; the norm's blocks write slots of a temporary
  // buffer, one per block of every launch.
  mx::array result = out;
  if (norm) {
    int64_t slots = 0;
    for (const auto& g : inputs) {
      slots += cuda_launch::chunks(static_cast<int64_t>(g.size()));
    }
    result = allocate_norm_slots(slots, "CUDA");
    encoder.add_temporary(result);
  } else {
    cuda::add_kernel(
        encoder,
        cuda::LaunchArrays().writes(out),
        cuda_kernels::clear_result,
        dim3(1),
        dim3(1),
        mx::gpu_ptr<void>(out));
  }
  // A chunk may mix dtypes: one set of launches per dtype.
  int64_t next_slot = 0;
  for (auto dtype : {mx::float32, mx::float16, mx::bfloat16}) {
    std::vector<mx::array> grads;
    for (const auto& g : inputs) {
      if (g.dtype() == dtype) {
        grads.push_back(g);
      }
    }
    if (grads.empty()) {
      continue;
    }
    cuda_launch::dispatch_dtype<__half, __nv_bfloat16>(
        element_type(dtype), [&](auto t) {
          using T = std::remove_pointer_t<decltype(t)>;
          if (norm) {
            read_gradients<T, true>(encoder, grads, result, next_slot);
          } else {
            read_gradients<T, false>(encoder, grads, result, next_slot);
          }
        });
  }
  if (norm) {
    cuda::add_kernel(
        encoder,
        cuda::LaunchArrays().reads(result).writes(out),
        cuda_kernels::sum_partials,
        dim3(1),
        dim3(cuda_launch::kThreads),
        static_cast<float*>(mx::gpu_ptr<void>(result)),
        next_slot,
        mx::gpu_ptr<float>(out));
  }
}

} // namespace mlx_fused_sgd
