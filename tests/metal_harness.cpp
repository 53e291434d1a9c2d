// Runs the Metal kernels of kernels/*.metal on the CPU: each kernel is
// compiled as C++ against tests/metal_shim/metal_stdlib and called for every
// thread of the grid that eval_gpu would launch, with the buffers and
// constants eval_gpu binds (both take them from kernels/sgd_launch.h).
// Built as a shared library by tests/test_metal_harness.py and driven from
// Python through ctypes.
#include <algorithm>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <typeindex>
#include <typeinfo>
#include <utility>

#include "kernels/sgd_launch.h"

namespace {
// name -> (function, its exact type): a lookup with another signature than
// the instantiated one fails (rc 1) instead of calling through a wrong type.
struct Entry {
  void* fn;
  std::type_index type;
};
std::map<std::string, Entry>& registry() {
  static std::map<std::string, Entry> r;
  return r;
}
template <typename F> bool record(const char* name, F* fn) {
  registry().insert_or_assign(
      name, Entry{reinterpret_cast<void*>(fn), std::type_index(typeid(F))});
  return true;
}
} // namespace

#define MFS_CAT2(a, b) a##b
#define MFS_CAT(a, b) MFS_CAT2(a, b)
#define MFS_INSTANTIATE(name, func, ...)                                       \
  static const bool MFS_CAT(mfs_registered_, __COUNTER__) =                    \
      record(name, &func<__VA_ARGS__>);

#include "kernels/grad_check.metal"
#include "kernels/sgd_update.metal"
#include "kernels/step_decay.metal"

// The kernels that are not templates, so not instantiated by name.
static const bool mfs_clear_registered =
    record("grad_check_clear", &grad_check_clear) &&
    record("grad_norm_clear", &grad_norm_clear);

namespace launch = mlx_fused_sgd::launch;

// The largest threadgroup eval_gpu asks for is the pipeline's limit (a
// multiple of the SIMD width, at most kMaxSimdGroups of them).
constexpr uint64_t kMaxThreadsPerGroup = 1024;

template <typename F> F* lookup(const std::string& name) {
  auto it = registry().find(name);
  if (it == registry().end() || it->second.type != std::type_index(typeid(F))) {
    return nullptr;
  }
  return reinterpret_cast<F*>(it->second.fn);
}

// The grid of a gradient-read kernel, threadgroup by threadgroup (eval_gpu's
// size): the threads of a threadgroup run together, meeting in simd_sum and
// threadgroup_barrier (tests/metal_shim/metal_stdlib). False when a
// threadgroup diverged (a thread left before a barrier, or threads stuck).
template <typename Call> bool run_grid_groups(int64_t threads, Call call) {
  auto g = launch::make_grid(threads, kMaxThreadsPerGroup);
  uint2 grid{static_cast<uint>(g.x), static_cast<uint>(g.y)};
  for (uint64_t y = 0; y < g.y; ++y) {
    for (uint64_t base = 0; base < g.x; base += g.group) {
      const unsigned n =
          static_cast<unsigned>(std::min<uint64_t>(g.group, g.x - base));
      const uint simd_groups = (n + mfs_simd::kWidth - 1) / mfs_simd::kWidth;
      const bool ok = mfs_simd::run(n, [&](unsigned i) {
        call(
            uint2{static_cast<uint>(base + i), static_cast<uint>(y)},
            grid,
            static_cast<uint>(i % mfs_simd::kWidth),
            static_cast<uint>(i / mfs_simd::kWidth),
            simd_groups);
      });
      if (!ok) {
        return false;
      }
    }
  }
  return true;
}

template <typename Call> void run_grid(int64_t threads, Call call) {
  auto g = launch::make_grid(threads, kMaxThreadsPerGroup);
  uint2 grid{static_cast<uint>(g.x), static_cast<uint>(g.y)};
  for (uint64_t y = 0; y < g.y; ++y) {
    for (uint64_t x = 0; x < g.x; ++x) {
      call(uint2{static_cast<uint>(x), static_cast<uint>(y)}, grid);
    }
  }
}

template <typename T, typename V>
int run_sgd_typed(
    const launch::SGDPlan& plan,
    bool contiguous,
    bool momentum,
    const void* param,
    const void* grad,
    const void* velocity,
    void* param_out,
    void* velocity_out,
    const float* lr,
    const uint64_t* step,
    const float* grad_scale,
    const uint* skip,
    const float* multiplier,
    const launch::StridedLayout* layout,
    const float* master,
    float* master_out,
    const uint64_t* rounding_step) {
  auto p = static_cast<const T*>(param);
  auto g = static_cast<const T*>(grad);
  auto v = static_cast<const V*>(velocity);
  auto po = static_cast<T*>(param_out);
  auto vo = static_cast<V*>(velocity_out);
  // Momentum off: eval_gpu binds grad and param_out in the velocity slots.
  if (!momentum) {
    v = reinterpret_cast<const V*>(g);
    vo = reinterpret_cast<V*>(po);
  }
  if (contiguous) {
    using F = void(
        const T*,
        const T*,
        const V*,
        T*,
        V*,
        const float*,
        const uint64_t*,
        const launch::SGDArgs&,
        const float*,
        const uint*,
        const float*,
        const float*,
        float*,
        const uint64_t*,
        uint2,
        uint2);
    auto fn = lookup<F>(plan.name);
    if (!fn) {
      return 1;
    }
    run_grid(plan.threads, [&](uint2 gid, uint2 grid) {
      fn(p,
         g,
         v,
         po,
         vo,
         lr,
         step,
         plan.args,
         grad_scale,
         skip,
         multiplier,
         master,
         master_out,
         rounding_step,
         gid,
         grid);
    });
  } else {
    using F = void(
        const T*,
        const T*,
        const V*,
        T*,
        V*,
        const float*,
        const uint64_t*,
        const launch::SGDArgs&,
        const int64_t*,
        const int64_t*,
        const int64_t*,
        const int64_t*,
        const float*,
        const uint*,
        const float*,
        const float*,
        float*,
        const uint64_t*,
        const int64_t*,
        const int64_t*,
        uint2,
        uint2);
    auto fn = lookup<F>(plan.name);
    if (!fn) {
      return 1;
    }
    run_grid(plan.threads, [&](uint2 gid, uint2 grid) {
      fn(p,
         g,
         v,
         po,
         vo,
         lr,
         step,
         plan.args,
         layout->shape.data(),
         layout->strides[launch::kLayoutParam].data(),
         layout->strides[launch::kLayoutGrad].data(),
         layout->strides[launch::kLayoutVelocity].data(),
         grad_scale,
         skip,
         multiplier,
         master,
         master_out,
         rounding_step,
         layout->strides[launch::kLayoutMaster].data(),
         layout->strides[launch::kLayoutOut].data(),
         gid,
         grid);
    });
  }
  return 0;
}

template <typename I>
int run_step_decay_typed(
    const launch::StepDecayPlan& plan,
    bool contiguous,
    const void* step,
    float* out,
    const int* shape,
    const int64_t* strides) {
  auto s = static_cast<const I*>(step);
  if (contiguous) {
    using F =
        void(const I*, float*, const launch::StepDecayArgs&, uint2, uint2);
    auto fn = lookup<F>(plan.name);
    if (!fn) {
      return 1;
    }
    run_grid(plan.threads, [&](uint2 gid, uint2 grid) {
      fn(s, out, plan.args, gid, grid);
    });
  } else {
    using F = void(
        const I*,
        float*,
        const launch::StepDecayArgs&,
        const int*,
        const int64_t*,
        uint2,
        uint2);
    auto fn = lookup<F>(plan.name);
    if (!fn) {
      return 1;
    }
    run_grid(plan.threads, [&](uint2 gid, uint2 grid) {
      fn(s, out, plan.args, shape, strides, gid, grid);
    });
  }
  return 0;
}

extern "C" {

int harness_kernel_count() {
  return static_cast<int>(registry().size());
}

// One tensor's update as eval_gpu launches it. Returns 0 on success, 1 when
// the kernel eval_gpu would pick is not instantiated, 2 for an unknown dtype.
int run_sgd(
    const char* dtype,
    const char* state_dtype,
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
    int contiguous,
    int64_t size,
    int ndim,
    const int* shape,
    const int64_t* param_strides,
    const int64_t* grad_strides,
    const int64_t* velocity_strides,
    const void* param,
    const void* grad,
    const void* velocity,
    void* param_out,
    void* velocity_out,
    const float* lr,
    const uint64_t* step,
    const float* grad_scale,
    const uint32_t* skip,
    const float* clip_factor,
    int rounding,
    uint64_t seed,
    uint64_t tensor_index,
    const float* master,
    float* master_out,
    const int64_t* master_strides,
    const uint64_t* rounding_step) {
  auto variant = launch::SGDVariant::from(
      momentum,
      weight_decay,
      dampening,
      nesterov,
      scaled != 0,
      maximize != 0,
      has_skip != 0,
      has_clip != 0,
      rounding,
      seed);
  // As in eval_gpu, slots whose input is absent get the learning rate's
  // buffer (never read).
  const float* scale_slot = variant.scale_grad ? grad_scale : lr;
  const uint* skip_slot =
      variant.skip ? skip : reinterpret_cast<const uint*>(lr);
  const float* clip_slot = variant.clip ? clip_factor : lr;
  const bool use_master = rounding == mlx_fused_sgd::math::kMasterWeights;
  const uint64_t* rounding_step_slot =
      rounding == mlx_fused_sgd::math::kRoundStochastic
          ? rounding_step
          : reinterpret_cast<const uint64_t*>(lr);
  // The layout eval_gpu plans from the operands' shape and strides.
  std::vector<int> dims(shape, shape + ndim);
  auto strides_of = [&](const int64_t* s) {
    return std::vector<int64_t>(s, s + ndim);
  };
  const auto ps = strides_of(param_strides);
  const auto gs = strides_of(grad_strides);
  const auto vs = variant.momentum ? strides_of(velocity_strides) : ps;
  const auto ms = use_master ? strides_of(master_strides) : ps;
  std::optional<launch::StridedLayout> layout;
  if (!contiguous) {
    layout = launch::plan_strided(
        dims,
        {&ps,
         &gs,
         variant.momentum ? &vs : nullptr,
         use_master ? &ms : nullptr});
  }
  auto plan = launch::plan_sgd(
      dtype,
      state_dtype,
      layout ? &*layout : nullptr,
      size,
      variant,
      {scheduled != 0, init, decay_rate, step_size},
      tensor_index);
  std::string d = dtype;
  std::string sd = state_dtype;
  auto run = [&]<typename T, typename V>() {
    return run_sgd_typed<T, V>(
        plan,
        contiguous,
        variant.momentum,
        param,
        grad,
        velocity,
        param_out,
        velocity_out,
        lr,
        step,
        scale_slot,
        skip_slot,
        clip_slot,
        layout ? &*layout : nullptr,
        // Without master weights eval_gpu binds param and param_out here.
        use_master ? master : static_cast<const float*>(param),
        use_master ? master_out : static_cast<float*>(param_out),
        rounding_step_slot);
  };
  if (d == "float32" && sd == "float32")
    return run.template operator()<float, float>();
  if (d == "float16" && sd == "float16")
    return run.template operator()<half, half>();
  if (d == "bfloat16" && sd == "bfloat16")
    return run.template operator()<bfloat, bfloat>();
  if (d == "float16" && sd == "float32")
    return run.template operator()<half, float>();
  if (d == "bfloat16" && sd == "float32")
    return run.template operator()<bfloat, float>();
  return 2;
}

int run_step_decay(
    const char* dtype,
    double init,
    double decay_rate,
    int64_t step_size,
    int contiguous,
    int64_t size,
    int ndim,
    const int* shape,
    const int64_t* strides,
    const void* step,
    float* out) {
  auto plan = launch::plan_step_decay(
      dtype, contiguous, size, ndim, init, decay_rate, step_size);
  std::string d = dtype;
  auto run = [&]<typename I>() {
    return run_step_decay_typed<I>(plan, contiguous, step, out, shape, strides);
  };
  if (d == "int8")
    return run.template operator()<int8_t>();
  if (d == "int16")
    return run.template operator()<int16_t>();
  if (d == "int32")
    return run.template operator()<int32_t>();
  if (d == "int64")
    return run.template operator()<int64_t>();
  if (d == "uint8")
    return run.template operator()<uint8_t>();
  if (d == "uint16")
    return run.template operator()<uint16_t>();
  if (d == "uint32")
    return run.template operator()<uint32_t>();
  if (d == "uint64")
    return run.template operator()<uint64_t>();
  return 2;
}

// One chunk's gradient read as GradCheck::eval_gpu launches it: the clear
// kernel, then one kernel per tensor accumulating into the output.
int run_grad_read(
    launch::GradRead kind,
    int count,
    const char* const* dtypes,
    const int* contiguous,
    const int64_t* sizes,
    const int* ndims,
    const int* const* shapes,
    const int64_t* const* strides,
    const void* const* data,
    void* out);

int run_grad_check(
    int count,
    const char* const* dtypes,
    const int* contiguous,
    const int64_t* sizes,
    const int* ndims,
    const int* const* shapes,
    const int64_t* const* strides,
    const void* const* data,
    uint32_t* flag) {
  return run_grad_read(
      launch::GradRead::check,
      count,
      dtypes,
      contiguous,
      sizes,
      ndims,
      shapes,
      strides,
      data,
      flag);
}

int run_grad_norm(
    int count,
    const char* const* dtypes,
    const int* contiguous,
    const int64_t* sizes,
    const int* ndims,
    const int* const* shapes,
    const int64_t* const* strides,
    const void* const* data,
    float* sum) {
  return run_grad_read(
      launch::GradRead::norm,
      count,
      dtypes,
      contiguous,
      sizes,
      ndims,
      shapes,
      strides,
      data,
      sum);
}

} // extern "C"

namespace {

template <typename Atomic>
int run_grad_read_typed(
    launch::GradRead kind,
    int count,
    const char* const* dtypes,
    const int* contiguous,
    const int64_t* sizes,
    const int* ndims,
    const int* const* shapes,
    const int64_t* const* strides,
    const void* const* data,
    void* out) {
  using Value = decltype(std::declval<Atomic>().load());
  Atomic result{Value(123)}; // garbage until the clear kernel runs
  using Clear = void(Atomic*, uint);
  auto clear = lookup<Clear>(launch::grad_read_clear_name(kind));
  if (!clear) {
    return 1;
  }
  clear(&result, 0);
  for (int t = 0; t < count; ++t) {
    if (sizes[t] == 0) {
      continue;
    }
    auto plan = launch::plan_grad_read(
        kind, dtypes[t], contiguous[t], sizes[t], ndims[t]);
    std::string d = dtypes[t];
    auto run = [&]<typename T>() {
      auto x = static_cast<const T*>(data[t]);
      if (contiguous[t]) {
        using F = void(
            const T*,
            Atomic*,
            const launch::CheckArgs&,
            uint2,
            uint2,
            uint,
            uint,
            uint);
        auto fn = lookup<F>(plan.name);
        if (!fn) {
          return 1;
        }
        if (!run_grid_groups(
                plan.threads,
                [&](uint2 gid, uint2 grid, uint lane, uint sg, uint sgs) {
                  fn(x, &result, plan.args, gid, grid, lane, sg, sgs);
                })) {
          return 3;
        }
      } else {
        using F = void(
            const T*,
            Atomic*,
            const launch::CheckArgs&,
            const int*,
            const int64_t*,
            uint2,
            uint2,
            uint,
            uint,
            uint);
        auto fn = lookup<F>(plan.name);
        if (!fn) {
          return 1;
        }
        if (!run_grid_groups(
                plan.threads,
                [&](uint2 gid, uint2 grid, uint lane, uint sg, uint sgs) {
                  fn(x,
                     &result,
                     plan.args,
                     shapes[t],
                     strides[t],
                     gid,
                     grid,
                     lane,
                     sg,
                     sgs);
                })) {
          return 3;
        }
      }
      return 0;
    };
    int rc = d == "float32"    ? run.template operator()<float>()
             : d == "float16"  ? run.template operator()<half>()
             : d == "bfloat16" ? run.template operator()<bfloat>()
                               : 2;
    if (rc != 0) {
      return rc;
    }
  }
  *static_cast<Value*>(out) = result.load();
  return 0;
}

} // namespace

int run_grad_read(
    launch::GradRead kind,
    int count,
    const char* const* dtypes,
    const int* contiguous,
    const int64_t* sizes,
    const int* ndims,
    const int* const* shapes,
    const int64_t* const* strides,
    const void* const* data,
    void* out) {
  return kind == launch::GradRead::check ? run_grad_read_typed<atomic_uint>(
                                               kind,
                                               count,
                                               dtypes,
                                               contiguous,
                                               sizes,
                                               ndims,
                                               shapes,
                                               strides,
                                               data,
                                               out)
                                         : run_grad_read_typed<atomic_float>(
                                               kind,
                                               count,
                                               dtypes,
                                               contiguous,
                                               sizes,
                                               ndims,
                                               shapes,
                                               strides,
                                               data,
                                               out);
}
