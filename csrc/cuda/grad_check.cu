// GradCheck (the non-finite check and the squared norm) on an NVIDIA GPU
// through MLX's CUDA backend (kernels/grad_check.cuh): the result cleared,
// then gradients that are one dense block read in multi-tensor launches, the
// others one launch each.
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

// Each launch reads its gradients and adds to `out`.
template <typename T, bool kNorm>
void read_gradients(
    mx::cu::CommandEncoder& encoder,
    const std::vector<mx::array>& grads,
    const mx::array& out) {
  void* result = mx::gpu_ptr<void>(out);
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
    cuda::add_kernel(
        encoder,
        cuda::LaunchArrays().reads(g).writes(out),
        cuda_kernels::grad_read_strided<T, kNorm>,
        cuda::grid(cuda_launch::chunks(size)),
        dim3(cuda_launch::kThreads),
        static_cast<T*>(mx::gpu_ptr<void>(g)),
        size,
        shape,
        result);
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
        arrays.writes(out),
        cuda_kernels::grad_read_multi_tensor<T, kNorm>,
        cuda::grid(span.blocks()),
        dim3(cuda_launch::kThreads),
        cuda_launch::make_read_table(span, flat, flat_sizes),
        result);
  }
}

} // namespace

void GradCheck::eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) {
  allocate(out);
  auto& encoder = mx::cu::get_command_encoder(stream());
  cuda::add_kernel(
      encoder,
      cuda::LaunchArrays().writes(out),
      cuda_kernels::clear_result,
      dim3(1),
      dim3(1),
      mx::gpu_ptr<void>(out));
  // A chunk may mix dtypes: one set of launches per dtype.
  const bool norm = kind_ == Kind::sq_norm;
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
        cuda::dtype_of(dtype), [&](auto t) {
          using T = std::remove_pointer_t<decltype(t)>;
          if (norm) {
            read_gradients<T, true>(encoder, grads, out);
          } else {
            read_gradients<T, false>(encoder, grads, out);
          }
        });
  }
}

} // namespace mlx_fused_sgd
