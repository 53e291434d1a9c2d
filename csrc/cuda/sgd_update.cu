// SGDUpdate on an NVIDIA GPU through MLX's CUDA backend
// (kernels/sgd_update.cuh). Row-contiguous tensors are updated by multi-tensor
// launches (up to cuda_launch::kMaxTensors a launch, one block a chunk); a
// tensor whose operands are not all row-contiguous by a strided launch of its
// own.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "mlx/backend/cuda/device.h"
#include "mlx/backend/cuda/utils.h"

#include "common/sgd_update.h"
#include "cuda/launch.h"
#include "kernels/cuda_dispatch.h"
#include "kernels/sgd_update.cuh"
#include "sgd_update.h"
#include "utils.h"

namespace mlx_fused_sgd {

namespace {

// What a launch updating tensor `t` reads and writes.
void add_tensor_arrays(cuda::LaunchArrays& arrays, const TensorSlots& t) {
  arrays.reads(t.p).reads(t.g).writes(t.p_out);
  if (t.v != nullptr) {
    arrays.reads(*t.v).writes(*t.v_out);
  }
  if (t.m != nullptr) {
    arrays.reads(*t.m).writes(*t.m_out);
  }
}

} // namespace

void SGDUpdate::eval_gpu(
    const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  check_layout(inputs, outputs);
  release_sibling_inputs(inputs, outputs);
  const int n = num_tensors_;
  const bool momentum = variant_.momentum;
  const bool master = master_weights();
  auto& encoder = mx::cu::get_command_encoder(stream());

  const auto in = scalar_inputs(inputs);
  // Every launch reads the scalars.
  cuda::LaunchArrays scalar_reads;
  for (const auto* scalar :
       {&in.lr, &in.grad_scale, &in.skip, &in.clip, &in.rounding_step}) {
    scalar_reads.reads(*scalar);
  }
  // Kernel arguments are passed to MLX's encoder as mutable values.
  cuda_launch::SGDScalars scalars{
      static_cast<const float*>(mx::gpu_ptr<void>(in.lr)),
      static_cast<const uint64_t*>(mx::gpu_ptr<void>(in.lr)),
      static_cast<const float*>(mx::gpu_ptr<void>(in.grad_scale)),
      static_cast<const uint32_t*>(mx::gpu_ptr<void>(in.skip)),
      static_cast<const float*>(mx::gpu_ptr<void>(in.clip)),
      static_cast<const uint64_t*>(mx::gpu_ptr<void>(in.rounding_step))};
  const mx::Dtype param_dtype = inputs[0].dtype();
  const mx::Dtype state_dtype = momentum ? inputs[2 * n].dtype() : param_dtype;

  std::vector<cuda_launch::SGDOperands> contiguous;
  std::vector<int64_t> contiguous_sizes;
  std::vector<TensorSlots> contiguous_slots;
  // A strided tensor's operands, layout and threads, planned (and refused)
  // before any launch is added.
  struct Strided {
    cuda_launch::SGDOperands operands;
    cuda_launch::StridedArgs layout;
    int64_t threads;
    TensorSlots slots;
  };
  std::vector<Strided> strided;
  for (int i = 0; i < n; ++i) {
    const auto slots = tensor_slots(inputs, outputs, n, i, momentum, master);
    allocate_tensor(slots);
    auto [p, g, v, p_out, v_out, m, m_out] = slots;
    if (p.size() == 0) {
      continue;
    }
    const cuda_launch::SGDOperands operands{
        mx::gpu_ptr<void>(p),
        mx::gpu_ptr<void>(g),
        momentum ? mx::gpu_ptr<void>(*v) : nullptr,
        mx::gpu_ptr<void>(p_out),
        momentum ? mx::gpu_ptr<void>(*v_out) : nullptr,
        master ? mx::gpu_ptr<float>(*m) : nullptr,
        master ? mx::gpu_ptr<float>(*m_out) : nullptr,
        static_cast<int64_t>(p.size()),
        tensor_id(i)};
    if (all_row_contiguous(p, g, v, m)) {
      contiguous.push_back(operands);
      contiguous_sizes.push_back(operands.size);
      contiguous_slots.push_back(slots);
    } else {
      const auto layout = strided_layout(p, g, v, m);
      Strided t{operands, {}, cuda_launch::strided_threads(layout), slots};
      if (!cuda_launch::to_strided_args(layout, t.layout)) {
        throw std::runtime_error(
            "mlx_fused_sgd: a tensor of " + std::to_string(layout.ndim()) +
            " axes that cannot be merged; the CUDA kernels take at most " +
            std::to_string(cuda_launch::kMaxDims) + ", as MLX's do.");
      }
      strided.push_back(t);
    }
  }

  auto base_args = launch::sgd_args(variant_, fused_schedule(), 0);
  const bool found = cuda_launch::dispatch_sgd<__half, __nv_bfloat16>(
      element_type(param_dtype),
      element_type(state_dtype),
      variant_,
      [&]<typename T, typename V, bool M, int R>() {
        for (const auto& span : cuda_launch::split_tables(contiguous_sizes)) {
          if (span.blocks() == 0) {
            continue;
          }
          auto table = cuda_launch::make_sgd_table(
              span, contiguous, sizeof(T), sizeof(V));
          auto arrays = scalar_reads;
          for (int k = 0; k < span.count; ++k) {
            add_tensor_arrays(arrays, contiguous_slots[span.first + k]);
          }
          cuda::add_kernel(
              encoder,
              arrays,
              cuda_kernels::sgd_multi_tensor<T, V, M, R>,
              cuda::grid(span.blocks()),
              dim3(cuda_launch::kThreads),
              table,
              base_args,
              scalars);
        }
        for (auto& [t, layout, threads, slots] : strided) {
          auto args = base_args;
          args.size = t.size;
          args.rounding_tensor = t.tensor_id;
          args.ndim = layout.ndim;
          element::TensorBuffers<T, V> b = {
              static_cast<const T*>(t.param),
              static_cast<const T*>(t.grad),
              static_cast<const V*>(t.velocity),
              static_cast<T*>(t.param_out),
              static_cast<V*>(t.velocity_out),
              t.master,
              t.master_out};
          auto arrays = scalar_reads;
          add_tensor_arrays(arrays, slots);
          cuda::add_kernel(
              encoder,
              arrays,
              cuda_kernels::sgd_strided<T, V, M, R>,
              cuda::grid(cuda_launch::blocks_for(threads)),
              dim3(cuda_launch::kThreads),
              b,
              args,
              layout,
              scalars);
        }
      });
  if (!found) {
    throw std::runtime_error(
        "mlx_fused_sgd: no CUDA kernel for " + dtype_name(param_dtype) +
        " params with " + dtype_name(state_dtype) + " momentum buffers.");
  }
}

} // namespace mlx_fused_sgd
