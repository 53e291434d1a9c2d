// Runs the CUDA kernels of kernels/*.cuh on the CPU: each kernel is compiled
// as C++ against tests/cuda_shim/cuda_shim.h and run block by block, each
// block's threads as fibers, over the launches eval_gpu makes: the same
// tables, chunks, dispatch and layouts (kernels/cuda_launch.h and
// kernels/cuda_dispatch.h, both shared with csrc/cuda/). Built as a shared
// library by tests/test_cuda_harness.py and driven from Python with ctypes.
// Return codes: 0 ran, 1 no kernel for those dtypes and variant, 2 a block
// diverged (a thread left before a barrier, or threads stuck), 3 a layout
// with more axes than the kernels take.
#include "cuda_shim.h"

#include <cstdint>
#include <vector>

#include "kernels/cuda_dispatch.h"
#include "kernels/grad_check.cuh"
#include "kernels/sgd_update.cuh"
#include "kernels/step_decay.cuh"

namespace mfs = mlx_fused_sgd;
namespace cl = mlx_fused_sgd::cuda_launch;
namespace ck = mlx_fused_sgd::cuda_kernels;

namespace {

size_t item_size(cl::Dtype dtype) {
  return dtype == cl::Dtype::float32 ? 4 : 2;
}

mfs::launch::SGDVariant variant_of(
    double momentum,
    double weight_decay,
    double dampening,
    int nesterov,
    int maximize,
    int scaled,
    int has_skip,
    int has_clip,
    int rounding,
    uint64_t seed) {
  return mfs::launch::SGDVariant::from(
      momentum,
      weight_decay,
      dampening,
      nesterov != 0,
      scaled != 0,
      maximize != 0,
      has_skip != 0,
      has_clip != 0,
      rounding,
      seed);
}

mfs::launch::SGDArgs args_of(
    const mfs::launch::SGDVariant& v,
    int scheduled,
    double init,
    double decay_rate,
    int64_t step_size,
    int64_t size,
    uint64_t tensor_id) {
  const mfs::launch::FusedSchedule schedule{
      scheduled != 0, init, decay_rate, step_size};
  // The name and thread count of plan_sgd are Metal's; its constants are
  // the same for CUDA.
  return mfs::launch::plan_sgd("", "", nullptr, size, v, schedule, tensor_id)
      .args;
}

} // namespace

extern "C" {

// One multi-tensor update of n row-contiguous tensors, launched as eval_gpu
// launches it (one launch per span of cuda_launch::kMaxTensors tensors).
int run_sgd_multi(
    int dtype,
    int state_dtype,
    double momentum,
    double weight_decay,
    double dampening,
    int nesterov,
    int maximize,
    int scaled,
    int has_skip,
    int has_clip,
    int scheduled,
    double init,
    double decay_rate,
    int64_t step_size,
    int rounding,
    uint64_t seed,
    int n,
    void** params,
    void** grads,
    void** velocities,
    void** params_out,
    void** velocities_out,
    void** masters,
    void** masters_out,
    const int64_t* sizes,
    const uint64_t* tensor_ids,
    const float* lr,
    const uint64_t* step,
    const float* grad_scale,
    const uint32_t* skip,
    const float* clip,
    const uint64_t* rounding_step) {
  const auto v = variant_of(
      momentum,
      weight_decay,
      dampening,
      nesterov,
      maximize,
      scaled,
      has_skip,
      has_clip,
      rounding,
      seed);
  std::vector<cl::SGDOperands> tensors;
  std::vector<int64_t> size_list(sizes, sizes + n);
  for (int i = 0; i < n; ++i) {
    tensors.push_back(
        {params[i],
         grads[i],
         v.momentum ? velocities[i] : nullptr,
         params_out[i],
         v.momentum ? velocities_out[i] : nullptr,
         masters ? static_cast<const float*>(masters[i]) : nullptr,
         masters_out ? static_cast<float*>(masters_out[i]) : nullptr,
         sizes[i],
         tensor_ids[i]});
  }
  const cl::SGDScalars scalars{lr, step, grad_scale, skip, clip, rounding_step};
  const auto args =
      args_of(v, scheduled, init, decay_rate, step_size, 0, tensor_ids[0]);
  int rc = 0;
  const bool found = cl::dispatch_sgd<__half, __nv_bfloat16>(
      static_cast<cl::Dtype>(dtype),
      static_cast<cl::Dtype>(state_dtype),
      v,
      [&]<typename T,
          typename V,
          bool WD,
          bool M,
          bool D,
          bool N,
          bool S,
          int R>() {
        for (const auto& span : cl::split_tables(size_list)) {
          const auto table =
              cl::make_sgd_table(span, tensors, sizeof(T), sizeof(V));
          const bool ok = mfs_cuda::launch(span.blocks(), cl::kThreads, [&] {
            ck::sgd_multi_tensor<T, V, WD, M, D, N, S, R>(table, args, scalars);
          });
          rc = ok ? rc : 2;
        }
      });
  return found ? rc : 1;
}

// One strided update of one tensor of `ndim` axes: the layout planned from
// the operands' element strides (null: absent) as eval_gpu plans it.
int run_sgd_strided(
    int dtype,
    int state_dtype,
    double momentum,
    double weight_decay,
    double dampening,
    int nesterov,
    int maximize,
    int scaled,
    int has_skip,
    int has_clip,
    int scheduled,
    double init,
    double decay_rate,
    int64_t step_size,
    int rounding,
    uint64_t seed,
    uint64_t tensor_id,
    int ndim,
    const int64_t* shape,
    const int64_t* param_strides,
    const int64_t* grad_strides,
    const int64_t* velocity_strides,
    const int64_t* master_strides,
    const void* param,
    const void* grad,
    const void* velocity,
    void* param_out,
    void* velocity_out,
    const float* master,
    float* master_out,
    const float* lr,
    const uint64_t* step,
    const float* grad_scale,
    const uint32_t* skip,
    const float* clip,
    const uint64_t* rounding_step) {
  const auto v = variant_of(
      momentum,
      weight_decay,
      dampening,
      nesterov,
      maximize,
      scaled,
      has_skip,
      has_clip,
      rounding,
      seed);
  std::vector<int64_t> dims(shape, shape + ndim);
  auto strides = [&](const int64_t* s) {
    return s ? std::vector<int64_t>(s, s + ndim) : std::vector<int64_t>();
  };
  const auto sp = strides(param_strides), sg = strides(grad_strides),
             sv = strides(v.momentum ? velocity_strides : nullptr),
             sm = strides(master_strides);
  const auto layout = mfs::launch::plan_strided(
      dims,
      {&sp,
       &sg,
       sv.empty() ? nullptr : &sv,
       sm.empty() ? nullptr : &sm});
  cl::StridedArgs strided{};
  if (!cl::to_strided_args(layout, strided)) {
    return 3;
  }
  int64_t size = 1;
  for (auto d : dims) {
    size *= d;
  }
  auto args =
      args_of(v, scheduled, init, decay_rate, step_size, size, tensor_id);
  args.ndim = layout.ndim();
  const cl::SGDScalars scalars{lr, step, grad_scale, skip, clip, rounding_step};
  int rc = 0;
  const bool found = cl::dispatch_sgd<__half, __nv_bfloat16>(
      static_cast<cl::Dtype>(dtype),
      static_cast<cl::Dtype>(state_dtype),
      v,
      [&]<typename T,
          typename V,
          bool WD,
          bool M,
          bool D,
          bool N,
          bool S,
          int R>() {
        const mfs::element::TensorBuffers<T, V> b = {
            static_cast<const T*>(param),
            static_cast<const T*>(grad),
            static_cast<const V*>(velocity),
            static_cast<T*>(param_out),
            static_cast<V*>(velocity_out),
            master,
            master_out};
        const int64_t blocks = cl::blocks_for(cl::strided_threads(layout));
        const bool ok = mfs_cuda::launch(blocks, cl::kThreads, [&] {
          ck::sgd_strided<T, V, WD, M, D, N, S, R>(b, args, strided, scalars);
        });
        rc = ok ? 0 : 2;
      });
  return found ? rc : 1;
}

// The gradient reads: kind 0 the non-finite check (result: a uint32 flag),
// 1 the squared norm (a float32 sum). Tensors with dense[i] are read flat in
// multi-tensor launches, the others one launch each with their shapes and
// strides (ndims[i] axes from shapes/strides, consecutively).
int run_grad_read(
    int kind,
    int dtype,
    int n,
    void** data,
    const int64_t* sizes,
    const int* dense,
    const int* ndims,
    const int64_t* shapes,
    const int64_t* strides,
    void* result) {
  std::vector<const void*> flat;
  std::vector<int64_t> flat_sizes;
  int rc = 0;
  auto run = [&]<typename T, bool kNorm>() {
    const int64_t* shape_at = shapes;
    const int64_t* strides_at = strides;
    for (int i = 0; i < n; ++i) {
      if (dense[i]) {
        flat.push_back(data[i]);
        flat_sizes.push_back(sizes[i]);
      } else {
        cl::ReadShape shape{};
        std::vector<int64_t> dims(shape_at, shape_at + ndims[i]);
        std::vector<int64_t> st(strides_at, strides_at + ndims[i]);
        if (!cl::to_read_shape(dims, st, shape)) {
          rc = 3;
          return;
        }
        const T* x = static_cast<const T*>(data[i]);
        const bool ok =
            mfs_cuda::launch(cl::chunks(sizes[i]), cl::kThreads, [&] {
              ck::grad_read_strided<T, kNorm>(x, sizes[i], shape, result);
            });
        rc = ok ? rc : 2;
      }
      shape_at += ndims[i];
      strides_at += ndims[i];
    }
    for (const auto& span : cl::split_tables(flat_sizes)) {
      const auto table = cl::make_read_table(span, flat, flat_sizes);
      const bool ok = mfs_cuda::launch(span.blocks(), cl::kThreads, [&] {
        ck::grad_read_multi_tensor<T, kNorm>(table, result);
      });
      rc = ok ? rc : 2;
    }
  };
  cl::dispatch_dtype<__half, __nv_bfloat16>(
      static_cast<cl::Dtype>(dtype), [&](auto t) {
        using T = std::remove_pointer_t<decltype(t)>;
        if (kind == 1) {
          run.template operator()<T, true>();
        } else {
          run.template operator()<T, false>();
        }
      });
  return rc;
}

// The step-decay learning rate of `size` uint64 steps (ndim 0: contiguous).
int run_step_decay(
    const uint64_t* step,
    float* out,
    int64_t size,
    double init,
    double decay_rate,
    int64_t step_size,
    int ndim,
    const int64_t* shape,
    const int64_t* strides) {
  const auto plan = mfs::launch::plan_step_decay(
      "uint64", ndim == 0, size, ndim, init, decay_rate, step_size);
  cl::ReadShape layout{};
  if (ndim > 0) {
    std::vector<int64_t> dims(shape, shape + ndim);
    std::vector<int64_t> st(strides, strides + ndim);
    if (!cl::to_read_shape(dims, st, layout)) {
      return 3;
    }
  }
  const bool ok = mfs_cuda::launch(cl::blocks_for(size), cl::kThreads, [&] {
    ck::step_decay<uint64_t>(step, out, plan.args, layout);
  });
  return ok ? 0 : 2;
}

} // extern "C"
