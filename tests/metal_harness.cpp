// Runs the Metal kernels of kernels/*.metal on the CPU: each kernel is
// compiled as C++ against tests/metal_shim/metal_stdlib and called for every
// thread of the grid that eval_gpu would launch, with the buffers and
// constants eval_gpu binds (both take them from kernels/metal_launch.h).
// Built as a shared library by tests/test_metal_harness.py and driven from
// Python through ctypes.
#include <algorithm>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <type_traits>
#include <typeindex>
#include <typeinfo>
#include <utility>
#include <vector>

#include "kernels/metal_launch.h"

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
    record("grad_norm_sum", &grad_norm_sum);

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

// Whether a grid runs its threadgroups last to first: a GPU runs them in no
// set order, and a result must not depend on it.
bool reverse_groups = false;

// The grid of a gradient-read kernel, threadgroup by threadgroup (eval_gpu's
// size): the threads of a threadgroup run together, meeting in simd_sum and
// threadgroup_barrier (tests/metal_shim/metal_stdlib). call(gid, grid,
// group, groups, lane, simd_group, simd_groups) for each thread. False when
// a threadgroup diverged (a thread left before a barrier, or threads stuck).
template <typename Call> bool run_grid_groups(int64_t threads, Call call) {
  auto g = launch::make_grid(threads, kMaxThreadsPerGroup);
  uint2 grid{static_cast<uint>(g.x), static_cast<uint>(g.y)};
  const uint64_t per_row = (g.x + g.group - 1) / g.group;
  uint2 groups{static_cast<uint>(per_row), static_cast<uint>(g.y)};
  const uint64_t total = per_row * g.y;
  for (uint64_t k = 0; k < total; ++k) {
    const uint64_t index = reverse_groups ? total - 1 - k : k;
    const uint64_t y = index / per_row;
    const uint64_t base = (index % per_row) * g.group;
    const unsigned n =
        static_cast<unsigned>(std::min<uint64_t>(g.group, g.x - base));
    const uint simd_groups = (n + mfs_simd::kWidth - 1) / mfs_simd::kWidth;
    const uint2 group{static_cast<uint>(index % per_row), static_cast<uint>(y)};
    const bool ok = mfs_simd::run(n, [&](unsigned i) {
      call(
          uint2{static_cast<uint>(base + i), static_cast<uint>(y)},
          grid,
          group,
          groups,
          static_cast<uint>(i % mfs_simd::kWidth),
          static_cast<uint>(i / mfs_simd::kWidth),
          simd_groups);
    });
    if (!ok) {
      return false;
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
  mlx_fused_sgd::math::SGDOptions options;
  options.momentum = momentum;
  options.weight_decay = weight_decay;
  options.dampening = dampening;
  options.nesterov = nesterov != 0;
  options.maximize = maximize != 0;
  auto variant = launch::SGDVariant::from(
      options, {scaled != 0, has_skip != 0, has_clip != 0}, rounding, seed);
  // As in eval_gpu, slots whose input is absent get the learning rate's
  // buffer (never read).
  const float* scale_slot = variant.scale_grad() ? grad_scale : lr;
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
  // Without momentum there is no buffer: eval_gpu names the param's dtype.
  std::string sd = variant.momentum ? state_dtype : dtype;
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

} // extern "C"

namespace {

// A gradient-read kernel's type: its leading parameters, then (gid, grid,
// [group, groups,] lane, simd_group, simd_groups): the norm's kernels also
// take their threadgroup's place in the grid.
template <bool kNorm, typename... Lead>
using ReadKernel = std::conditional_t<
    kNorm,
    void(Lead..., uint2, uint2, uint2, uint2, uint, uint, uint),
    void(Lead..., uint2, uint2, uint, uint, uint)>;

// Runs gradient-read kernel `name` over the grid of `threads` threads with
// leading arguments `lead`: 0, or 1 no such kernel, 3 divergent.
template <bool kNorm, typename... Lead>
int run_read_kernel(const std::string& name, int64_t threads, Lead... lead) {
  auto fn = lookup<ReadKernel<kNorm, Lead...>>(name);
  if (!fn) {
    return 1;
  }
  const bool ok = run_grid_groups(
      threads,
      [&](uint2 gid,
          uint2 grid,
          uint2 group,
          uint2 groups,
          uint lane,
          uint simd_group,
          uint simd_groups) {
        if constexpr (kNorm) {
          fn(lead..., gid, grid, group, groups, lane, simd_group, simd_groups);
        } else {
          fn(lead..., gid, grid, lane, simd_group, simd_groups);
        }
      });
  return ok ? 0 : 3;
}

// One tensor's dispatch of a gradient-read kernel: the check's takes the
// flag, the norm's its slots.
template <typename T, bool kNorm>
int run_grad_read_tensor(
    const launch::CheckPlan& plan,
    bool contiguous,
    const T* x,
    const int* shape,
    const int64_t* strides,
    atomic_uint* flag,
    float* slots) {
  using Result = std::conditional_t<kNorm, float*, atomic_uint*>;
  Result result;
  if constexpr (kNorm) {
    result = slots;
  } else {
    result = flag;
  }
  using Args = const launch::CheckArgs&;
  if (contiguous) {
    return run_read_kernel<kNorm, const T*, Result, Args>(
        plan.name, plan.threads, x, result, plan.args);
  }
  return run_read_kernel<
      kNorm,
      const T*,
      Result,
      Args,
      const int*,
      const int64_t*>(
      plan.name, plan.threads, x, result, plan.args, shape, strides);
}

template <bool kNorm>
int run_grad_read_kind(
    int count,
    const char* const* dtypes,
    const int* contiguous,
    const int64_t* sizes,
    const int* ndims,
    const int* const* shapes,
    const int64_t* const* strides,
    const void* const* data,
    void* out,
    float slot_fill) {
  const auto kind = kNorm ? launch::GradRead::norm : launch::GradRead::check;
  atomic_uint flag{123u}; // garbage until the clear kernel runs
  std::vector<launch::CheckPlan> plans(count);
  int64_t slot_count = 0;
  for (int t = 0; t < count; ++t) {
    if (sizes[t] == 0) {
      continue;
    }
    plans[t] = launch::plan_grad_read(
        kind, dtypes[t], contiguous[t], sizes[t], ndims[t]);
    plans[t].args.first_slot = slot_count;
    slot_count += launch::threadgroups(
        launch::make_grid(plans[t].threads, kMaxThreadsPerGroup));
  }
  std::vector<float> slots(std::max<int64_t>(slot_count, 1), slot_fill);
  if (!kNorm) {
    using Clear = void(atomic_uint*, uint);
    auto clear = lookup<Clear>(launch::kGradCheckClear);
    if (!clear) {
      return 1;
    }
    clear(&flag, 0);
  }
  for (int t = 0; t < count; ++t) {
    if (sizes[t] == 0) {
      continue;
    }
    const std::string d = dtypes[t];
    auto run = [&]<typename T>() {
      return run_grad_read_tensor<T, kNorm>(
          plans[t],
          contiguous[t],
          static_cast<const T*>(data[t]),
          shapes[t],
          strides[t],
          &flag,
          slots.data());
    };
    const int rc = d == "float32"    ? run.template operator()<float>()
                   : d == "float16"  ? run.template operator()<half>()
                   : d == "bfloat16" ? run.template operator()<bfloat>()
                                     : 2;
    if (rc != 0) {
      return rc;
    }
  }
  if constexpr (kNorm) {
    using Sum = void(
        const float*, float*, const int64_t&, uint, uint, uint, uint, uint);
    auto sum = lookup<Sum>(launch::kGradNormSum);
    if (!sum) {
      return 1;
    }
    // One threadgroup as wide as eval_gpu asks for.
    const unsigned n = static_cast<unsigned>(kMaxThreadsPerGroup);
    const uint simd_groups = n / mfs_simd::kWidth;
    float total = 123.0f;
    const bool ok = mfs_simd::run(n, [&](unsigned i) {
      sum(slots.data(),
          &total,
          slot_count,
          i,
          n,
          i % mfs_simd::kWidth,
          i / mfs_simd::kWidth,
          simd_groups);
    });
    if (!ok) {
      return 3;
    }
    *static_cast<float*>(out) = total;
  } else {
    *static_cast<uint32_t*>(out) = flag.load();
  }
  return 0;
}

} // namespace

extern "C" {

// One chunk's gradient read as GradCheck::eval_gpu launches it. The check:
// the clear kernel, then one dispatch per tensor OR-ing the flag. The norm:
// one dispatch per tensor, each threadgroup writing its slot of a buffer
// that starts filled with `slot_fill` (eval_gpu does not clear it), then
// grad_norm_sum adds the slots up.
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
  return run_grad_read_kind<false>(
      count,
      dtypes,
      contiguous,
      sizes,
      ndims,
      shapes,
      strides,
      data,
      flag,
      0.0f);
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
    float* sum,
    float slot_fill) {
  return run_grad_read_kind<true>(
      count,
      dtypes,
      contiguous,
      sizes,
      ndims,
      shapes,
      strides,
      data,
      sum,
      slot_fill);
}

// Grids run their threadgroups last to first (reverse != 0) or first to last.
void set_reverse_groups(int reverse) {
  reverse_groups = reverse != 0;
}

} // extern "C"
