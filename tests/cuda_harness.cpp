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

#include <algorithm>
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

// An update's dtypes, variant and schedule, as the Python side passes them
// (tests/test_cuda_harness.py mirrors this struct).
struct Variant {
  int32_t dtype;
  int32_t state_dtype;
  double momentum;
  double weight_decay;
  double dampening;
  int32_t nesterov;
  int32_t maximize;
  int32_t scaled;
  int32_t has_skip;
  int32_t has_clip;
  int32_t scheduled;
  double init;
  double decay_rate;
  int64_t step_size;
  int32_t rounding;
  uint64_t seed;
};

mfs::launch::SGDVariant sgd_variant(const Variant& v) {
  mfs::math::SGDOptions options;
  options.momentum = v.momentum;
  options.weight_decay = v.weight_decay;
  options.dampening = v.dampening;
  options.nesterov = v.nesterov != 0;
  options.maximize = v.maximize != 0;
  return mfs::launch::SGDVariant::from(
      options,
      {v.scaled != 0, v.has_skip != 0, v.has_clip != 0},
      v.rounding,
      v.seed);
}

// The launch constants of a tensor of `size` elements, as eval_gpu makes
// them.
mfs::launch::SGDArgs sgd_args(const Variant& v, int64_t size, uint64_t id) {
  const mfs::launch::FusedSchedule schedule{
      v.scheduled != 0, v.init, v.decay_rate, v.step_size};
  return mfs::launch::sgd_args(sgd_variant(v), schedule, size, 0, id);
}

// Runs `launches` for the kernel of `v`, as eval_gpu dispatches: 0 ran, 1
// no kernel, 2 a block diverged.
template <typename Launches>
int with_kernel(const Variant& v, Launches&& launches) {
  bool ok = true;
  const bool found = cl::dispatch_sgd<__half, __nv_bfloat16>(
      static_cast<mfs::launch::ElementType>(v.dtype),
      static_cast<mfs::launch::ElementType>(v.state_dtype),
      sgd_variant(v),
      [&]<typename T, typename V, bool M, int R>() {
        ok = launches.template operator()<T, V, M, R>();
      });
  return !found ? 1 : ok ? 0 : 2;
}

} // namespace

extern "C" {

// One multi-tensor update of n row-contiguous tensors, launched as eval_gpu
// launches it (one launch per span of cuda_launch::kMaxTensors tensors).
int run_sgd_multi(
    const Variant* variant,
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
    const cl::SGDScalars* scalars) {
  const bool momentum = sgd_variant(*variant).momentum;
  std::vector<cl::SGDOperands> tensors;
  std::vector<int64_t> size_list(sizes, sizes + n);
  for (int i = 0; i < n; ++i) {
    tensors.push_back(
        {params[i],
         grads[i],
         momentum ? velocities[i] : nullptr,
         params_out[i],
         momentum ? velocities_out[i] : nullptr,
         masters ? static_cast<const float*>(masters[i]) : nullptr,
         masters_out ? static_cast<float*>(masters_out[i]) : nullptr,
         sizes[i],
         tensor_ids[i]});
  }
  const auto args = sgd_args(*variant, 0, 0);
  return with_kernel(
      *variant,
      [&]<typename T, typename V, bool M, int R>() {
        bool ok = true;
        for (const auto& span : cl::split_tables(size_list)) {
          const auto table =
              cl::make_sgd_table(span, tensors, sizeof(T), sizeof(V));
          ok = mfs_cuda::launch(
                   span.blocks(),
                   cl::kThreads,
                   [&] {
                     ck::sgd_multi_tensor<T, V, M, R>(
                         table, args, *scalars);
                   }) &&
               ok;
        }
        return ok;
      });
}

// One strided update of one tensor of `ndim` axes: the layout planned from
// the operands' element strides (null: absent) as eval_gpu plans it.
int run_sgd_strided(
    const Variant* variant,
    uint64_t tensor_id,
    int ndim,
    const int64_t* shape,
    const int64_t* const* operand_strides, // param, grad, velocity, master
    const void* param,
    const void* grad,
    const void* velocity,
    void* param_out,
    void* velocity_out,
    const float* master,
    float* master_out,
    const cl::SGDScalars* scalars) {
  const bool momentum = sgd_variant(*variant).momentum;
  std::vector<int64_t> dims(shape, shape + ndim);
  std::vector<int64_t> strides[mfs::launch::kLayoutOut];
  const std::vector<int64_t>* present[mfs::launch::kLayoutOut] = {};
  for (int op = 0; op < mfs::launch::kLayoutOut; ++op) {
    const int64_t* s = operand_strides[op];
    if (s != nullptr && (op != mfs::launch::kLayoutVelocity || momentum)) {
      strides[op].assign(s, s + ndim);
      present[op] = &strides[op];
    }
  }
  const auto layout = mfs::launch::plan_strided(dims, present);
  cl::StridedArgs strided{};
  if (!cl::to_strided_args(layout, strided)) {
    return 3;
  }
  int64_t size = 1;
  for (auto d : dims) {
    size *= d;
  }
  auto args = sgd_args(*variant, size, tensor_id);
  args.ndim = layout.ndim();
  return with_kernel(
      *variant,
      [&]<typename T, typename V, bool M, int R>() {
        const mfs::element::TensorBuffers<T, V> b = {
            static_cast<const T*>(param),
            static_cast<const T*>(grad),
            static_cast<const V*>(velocity),
            static_cast<T*>(param_out),
            static_cast<V*>(velocity_out),
            master,
            master_out};
        const int64_t blocks = cl::blocks_for(cl::strided_threads(layout));
        return mfs_cuda::launch(blocks, cl::kThreads, [&] {
          ck::sgd_strided<T, V, M, R>(b, args, strided, *scalars);
        });
      });
}

// Launches run their blocks last to first (reverse != 0) or first to last.
void set_reverse_blocks(int reverse) {
  mfs_cuda::reverse_blocks() = reverse != 0;
}

// The gradient reads: kind 0 the non-finite check (result: a uint32 flag,
// cleared by the caller), 1 the squared norm (result: a float32). For the
// norm every block writes a slot of a buffer that starts filled with
// `slot_fill` (eval_gpu does not clear it), then sum_partials adds the
// slots up. Tensors with dense[i] are read flat in multi-tensor launches,
// the others one launch each with their shapes and strides (ndims[i] axes
// from shapes/strides, consecutively).
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
    void* result,
    float slot_fill) {
  std::vector<const void*> flat;
  std::vector<int64_t> flat_sizes;
  int64_t slot_count = 0;
  for (int i = 0; i < n; ++i) {
    slot_count += cl::chunks(sizes[i]);
  }
  std::vector<float> slots(std::max<int64_t>(slot_count, 1), slot_fill);
  void* into = kind == 1 ? static_cast<void*>(slots.data()) : result;
  int64_t next_slot = 0;
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
              ck::grad_read_strided<T, kNorm>(
                  x, sizes[i], shape, into, next_slot);
            });
        next_slot += cl::chunks(sizes[i]);
        rc = ok ? rc : 2;
      }
      shape_at += ndims[i];
      strides_at += ndims[i];
    }
    for (const auto& span : cl::split_tables(flat_sizes)) {
      const auto table = cl::make_read_table(span, flat, flat_sizes);
      const bool ok = mfs_cuda::launch(span.blocks(), cl::kThreads, [&] {
        ck::grad_read_multi_tensor<T, kNorm>(table, into, next_slot);
      });
      next_slot += span.blocks();
      rc = ok ? rc : 2;
    }
  };
  cl::dispatch_dtype<__half, __nv_bfloat16>(
      static_cast<mfs::launch::ElementType>(dtype), [&](auto t) {
        using T = std::remove_pointer_t<decltype(t)>;
        if (kind == 1) {
          run.template operator()<T, true>();
        } else {
          run.template operator()<T, false>();
        }
      });
  if (kind == 1 && rc == 0) {
    const bool ok = mfs_cuda::launch(1, cl::kThreads, [&] {
      ck::sum_partials(slots.data(), next_slot, static_cast<float*>(result));
    });
    rc = ok ? rc : 2;
  }
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
  const auto args =
      mfs::launch::step_decay_args(size, ndim, init, decay_rate, step_size);
  cl::ReadShape layout{};
  if (ndim > 0) {
    std::vector<int64_t> dims(shape, shape + ndim);
    std::vector<int64_t> st(strides, strides + ndim);
    if (!cl::to_read_shape(dims, st, layout)) {
      return 3;
    }
  }
  const bool ok = mfs_cuda::launch(cl::blocks_for(size), cl::kThreads, [&] {
    ck::step_decay<uint64_t>(step, out, args, layout);
  });
  return ok ? 0 : 2;
}

} // extern "C"
