// Python bindings of mlx-fused-sgd (module mlx_fused_sgd._ext).
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/variant.h>
#include <nanobind/stl/vector.h>

#include "mlx/version.h"

#include "cpu/sgd_cpu_kernel.h"
#include "grad_check.h"
#include "sgd_update.h"
#include "step_decay.h"
#include "tree.h"
#include "utils.h"

namespace nb = nanobind;
using namespace nb::literals;
namespace mfs = mlx_fused_sgd;
namespace mx = mlx::core;

#define MFS_STR2(x) #x
#define MFS_STR(x) MFS_STR2(x)

namespace {

using OptionalArray = std::optional<mx::array>;

std::pair<mx::array, OptionalArray> single_result(mfs::SGDResult r) {
  OptionalArray v;
  if (!r.velocities.empty()) {
    v = r.velocities[0];
  }
  return {r.params[0], v};
}

using OptionalArrays = std::vector<OptionalArray>;

// The many-tensor functions' result: new params, new velocities and new
// master copies (None where a param has none).
std::tuple<std::vector<mx::array>, std::vector<mx::array>, OptionalArrays>
many_result(mfs::SGDResult r) {
  return {
      std::move(r.params), std::move(r.velocities), std::move(r.master_params)};
}

// Settings of the many-tensor functions, with the half-precision storage
// options (master weights, stochastic rounding) they alone take.
mfs::SGDSettings many_settings(
    double momentum,
    double weight_decay,
    double dampening,
    bool nesterov,
    bool maximize,
    const OptionalArray& grad_scale,
    const OptionalArray& skip,
    const OptionalArray& clip_factor,
    const std::optional<OptionalArrays>& master_params,
    std::optional<uint64_t> rounding_seed,
    const OptionalArray& rounding_step) {
  mfs::SGDSettings settings{
      momentum,
      weight_decay,
      dampening,
      nesterov,
      maximize,
      grad_scale,
      skip,
      clip_factor};
  if (master_params) {
    settings.master_params = *master_params;
  }
  settings.rounding_seed = rounding_seed;
  settings.rounding_step = rounding_step;
  return settings;
}

std::vector<mx::array> as_list(const OptionalArray& v) {
  return v ? std::vector<mx::array>{*v} : std::vector<mx::array>{};
}

} // namespace

static_assert(
    mfs::kDefaultTensorsPerPrimitive == 4 &&
        mfs::kDefaultTensorsPerCheck == 1024,
    "update the tensors_per_primitive default in the nb::sig strings below");

namespace {

// The instruction set of the CPU loops and what GPU streams run.
void bind_backend(nb::module_& m) {
  m.def(
      "cpu_isa",
      &mfs::cpu_kernel::selected_isa,
      "The instruction set of the CPU update loop in use: 'generic', 'avx2' "
      "or 'avx512' (MLX_FUSED_SGD_CPU_ISA overrides the CPUID choice).");

  // What GPU streams run (backend_info()); a metallib that fails to load is
  // reported once as a Python RuntimeWarning.
  auto status_dict = [](const mfs::GpuKernelStatus& st) {
    auto text_or_none = [](const std::string& x) -> nb::object {
      return x.empty() ? nb::object(nb::none())
                       : nb::object(nb::str(x.c_str()));
    };
    nb::dict d;
    d["fused"] = st.fused;
    d["library"] = text_or_none(st.library_path);
    d["reason"] = text_or_none(st.reason);
    return d;
  };

  mfs::set_gpu_fallback_notifier([](const std::string& message) {
    nb::gil_scoped_acquire gil;
    if (PyErr_WarnEx(PyExc_RuntimeWarning, message.c_str(), 1) != 0) {
      throw nb::python_error();
    }
  });

  m.def(
      "gpu_kernel_status",
      [status_dict]() { return status_dict(mfs::gpu_kernel_status()); },
      "Whether GPU streams run this package's kernels ('fused'), the "
      "metallib ('library') and why not ('reason'); decided once, loading "
      "the metallib.");

  m.def(
      "_decide_gpu_kernels",
      [status_dict](
          bool built_with_kernels,
          const std::string& library_path,
          std::optional<std::string> load_error,
          const std::string& no_kernels_reason) {
        auto load = [&] {
          if (load_error) {
            throw std::runtime_error(*load_error);
          }
        };
        return status_dict(mfs::decide_gpu_kernels(
            built_with_kernels, library_path, load, no_kernels_reason));
      },
      "built_with_kernels"_a,
      "library_path"_a,
      "load_error"_a,
      "no_kernels_reason"_a,
      "The decision behind gpu_kernel_status with a simulated load (for "
      "tests): load_error, when given, is what the load throws.");
}

// The step-decay schedule.
void bind_step_decay(nb::module_& m) {
  m.def(
      "validate_step_decay",
      [](double init, double decay_rate, int64_t step_size) {
        mfs::StepDecay{init, decay_rate, step_size}.validate();
      },
      "init"_a,
      "decay_rate"_a,
      "step_size"_a,
      "Raise ValueError naming the first invalid step-decay number.");

  m.def(
      "step_decay_lr",
      &mfs::step_decay_lr,
      "step"_a,
      "init"_a,
      "decay_rate"_a,
      "step_size"_a,
      nb::kw_only(),
      "stream"_a = nb::none(),
      nb::sig("def step_decay_lr(step: mlx.core.array, init: float, "
              "decay_rate: float, step_size: int, *, "
              "stream: mlx.core.Stream | mlx.core.Device | None = None) "
              "-> mlx.core.array"),
      R"(Step-decay learning rate of an integer step array, as one primitive.

Computes ``float32(init) * float32(decay_rate) ** float32(step // step_size)``
for every element of ``step``, bit-identical to
``mlx.optimizers.step_decay(init, decay_rate, step_size)(step)`` on the CPU.

Args:
    step (array): Integer array of steps, any shape.
    init (float): Initial value.
    decay_rate (float): Multiplicative factor to decay by.
    step_size (int): Decay every ``step_size`` steps (>= 1).
    stream (Stream or Device, optional): Where to run the op.

Returns:
    array: float32 learning rates of ``step``'s shape.)");
}

// The gradient reads: the non-finite check and the squared norm.
void bind_grad_check(nb::module_& m) {
  m.def(
      "grads_nonfinite",
      [](const std::vector<mx::array>& grads,
         int tensors_per_primitive,
         mx::StreamOrDevice s) {
        return mfs::grads_nonfinite(grads, tensors_per_primitive, s);
      },
      "grads"_a,
      nb::kw_only(),
      "tensors_per_primitive"_a = mfs::kDefaultTensorsPerCheck,
      "stream"_a = nb::none(),
      nb::sig("def grads_nonfinite(grads: list[mlx.core.array], *, "
              "tensors_per_primitive: int = 1024, "
              "stream: mlx.core.Stream | mlx.core.Device | None = None) "
              "-> mlx.core.array"),
      R"(A boolean scalar, on the device: True when any element of any gradient
is NaN or Inf. Pass it as ``skip`` to the update functions to make a step a
no-op without a host round trip (what ``FusedSGD(skip_nonfinite=True)``
does).)");

  m.def(
      "grads_sq_norm",
      [](const std::vector<mx::array>& grads,
         int tensors_per_primitive,
         mx::StreamOrDevice s) {
        return mfs::grads_sq_norm(grads, tensors_per_primitive, s);
      },
      "grads"_a,
      nb::kw_only(),
      "tensors_per_primitive"_a = mfs::kDefaultTensorsPerCheck,
      "stream"_a = nb::none(),
      nb::sig("def grads_sq_norm(grads: list[mlx.core.array], *, "
              "tensors_per_primitive: int = 1024, "
              "stream: mlx.core.Stream | mlx.core.Device | None = None) "
              "-> mlx.core.array"),
      R"(The squared L2 norm of all gradients together, a float32 scalar on
the device (per tensor summed in double and rounded, then added in order).)");
}

// The update of one tensor, and the settings check.
void bind_sgd_update(nb::module_& m) {
  m.def(
      "validate_sgd_settings",
      [](double momentum,
         double weight_decay,
         double dampening,
         bool nesterov) {
        mfs::SGDSettings{momentum, weight_decay, dampening, nesterov}
            .validate();
      },
      "momentum"_a,
      "weight_decay"_a,
      "dampening"_a,
      "nesterov"_a,
      "Raise ValueError naming the first invalid SGD hyperparameter.");

  m.def(
      "sgd_update",
      [](const mx::array& param,
         const mx::array& grad,
         const OptionalArray& velocity,
         const mx::array& learning_rate,
         double momentum,
         double weight_decay,
         double dampening,
         bool nesterov,
         bool maximize,
         const OptionalArray& grad_scale,
         const OptionalArray& skip,
         const OptionalArray& clip_factor,
         mx::StreamOrDevice s) {
        return single_result(mfs::sgd_update_many(
            {param},
            {grad},
            as_list(velocity),
            learning_rate,
            {momentum,
             weight_decay,
             dampening,
             nesterov,
             maximize,
             grad_scale,
             skip,
             clip_factor},
            1,
            s));
      },
      "param"_a,
      "grad"_a,
      "velocity"_a = nb::none(),
      nb::kw_only(),
      "learning_rate"_a,
      "momentum"_a = 0.0,
      "weight_decay"_a = 0.0,
      "dampening"_a = 0.0,
      "nesterov"_a = false,
      "maximize"_a = false,
      "grad_scale"_a = nb::none(),
      "skip"_a = nb::none(),
      "clip_factor"_a = nb::none(),
      "stream"_a = nb::none(),
      nb::sig("def sgd_update(param: mlx.core.array, grad: mlx.core.array, "
              "velocity: mlx.core.array | None = None, *, "
              "learning_rate: mlx.core.array, momentum: float = 0.0, "
              "weight_decay: float = 0.0, dampening: float = 0.0, "
              "nesterov: bool = False, maximize: bool = False, "
              "grad_scale: mlx.core.array | None = None, "
              "skip: mlx.core.array | None = None, "
              "clip_factor: mlx.core.array | None = None, "
              "stream: mlx.core.Stream | mlx.core.Device | None = None) "
              "-> tuple[mlx.core.array, mlx.core.array | None]"),
      R"(One fused SGD step of one tensor (one primitive, one pass).

Returns ``(new_param, new_velocity)``; ``new_velocity`` is ``velocity``
unchanged when momentum is 0. ``learning_rate`` is a scalar array.)");
}

// The update of one tensor with the schedule folded in.
void bind_sgd_update_scheduled(nb::module_& m) {
  m.def(
      "sgd_update_scheduled",
      [](const mx::array& param,
         const mx::array& grad,
         const OptionalArray& velocity,
         const mx::array& step,
         double init,
         double decay_rate,
         int64_t step_size,
         double momentum,
         double weight_decay,
         double dampening,
         bool nesterov,
         bool maximize,
         const OptionalArray& grad_scale,
         const OptionalArray& skip,
         const OptionalArray& clip_factor,
         mx::StreamOrDevice s) {
        return single_result(mfs::sgd_update_many_scheduled(
            {param},
            {grad},
            as_list(velocity),
            step,
            {init, decay_rate, step_size},
            {momentum,
             weight_decay,
             dampening,
             nesterov,
             maximize,
             grad_scale,
             skip,
             clip_factor},
            1,
            s));
      },
      "param"_a,
      "grad"_a,
      "velocity"_a = nb::none(),
      nb::kw_only(),
      "step"_a,
      "init"_a,
      "decay_rate"_a,
      "step_size"_a,
      "momentum"_a = 0.0,
      "weight_decay"_a = 0.0,
      "dampening"_a = 0.0,
      "nesterov"_a = false,
      "maximize"_a = false,
      "grad_scale"_a = nb::none(),
      "skip"_a = nb::none(),
      "clip_factor"_a = nb::none(),
      "stream"_a = nb::none(),
      nb::sig(
          "def sgd_update_scheduled(param: mlx.core.array, "
          "grad: mlx.core.array, velocity: mlx.core.array | None = None, *, "
          "step: mlx.core.array, init: float, decay_rate: float, "
          "step_size: int, momentum: float = 0.0, weight_decay: float = 0.0, "
          "dampening: float = 0.0, nesterov: bool = False, maximize: bool = "
          "False, "
          "grad_scale: mlx.core.array | None = None, "
          "skip: mlx.core.array | None = None, "
          "clip_factor: mlx.core.array | None = None, "
          "stream: mlx.core.Stream | mlx.core.Device | None = None) "
          "-> tuple[mlx.core.array, mlx.core.array | None]"),
      R"(One fused SGD step with the step-decay learning rate computed in the
kernel from the integer ``step`` counter (the step *before* increment).)");
}

// The update of many tensors with a learning-rate array.
void bind_sgd_update_many(nb::module_& m) {
  m.def(
      "sgd_update_many",
      [](const std::vector<mx::array>& params,
         const std::vector<mx::array>& grads,
         const std::vector<mx::array>& velocities,
         const mx::array& learning_rate,
         double momentum,
         double weight_decay,
         double dampening,
         bool nesterov,
         bool maximize,
         const OptionalArray& grad_scale,
         const OptionalArray& skip,
         const OptionalArray& clip_factor,
         const std::optional<OptionalArrays>& master_params,
         std::optional<uint64_t> rounding_seed,
         const OptionalArray& rounding_step,
         int tensors_per_primitive,
         mx::StreamOrDevice s) {
        auto r = mfs::sgd_update_many(
            params,
            grads,
            velocities,
            learning_rate,
            many_settings(
                momentum,
                weight_decay,
                dampening,
                nesterov,
                maximize,
                grad_scale,
                skip,
                clip_factor,
                master_params,
                rounding_seed,
                rounding_step),
            tensors_per_primitive,
            s);
        return many_result(std::move(r));
      },
      "params"_a,
      "grads"_a,
      "velocities"_a,
      nb::kw_only(),
      "learning_rate"_a,
      "momentum"_a = 0.0,
      "weight_decay"_a = 0.0,
      "dampening"_a = 0.0,
      "nesterov"_a = false,
      "maximize"_a = false,
      "grad_scale"_a = nb::none(),
      "skip"_a = nb::none(),
      "clip_factor"_a = nb::none(),
      "master_params"_a = nb::none(),
      "rounding_seed"_a = nb::none(),
      "rounding_step"_a = nb::none(),
      "tensors_per_primitive"_a = mfs::kDefaultTensorsPerPrimitive,
      "stream"_a = nb::none(),
      nb::sig(
          "def sgd_update_many(params: list[mlx.core.array], "
          "grads: list[mlx.core.array], velocities: list[mlx.core.array], *, "
          "learning_rate: mlx.core.array, momentum: float = 0.0, "
          "weight_decay: float = 0.0, dampening: float = 0.0, "
          "nesterov: bool = False, maximize: bool = False, "
          "grad_scale: mlx.core.array | None = None, "
          "skip: mlx.core.array | None = None, "
          "clip_factor: mlx.core.array | None = None, "
          "master_params: list[mlx.core.array | None] | None = None, "
          "rounding_seed: int | None = None, "
          "rounding_step: mlx.core.array | None = None, tensors_per_primitive: "
          "int = 4, "
          "stream: mlx.core.Stream | mlx.core.Device | None = None) "
          "-> tuple[list[mlx.core.array], list[mlx.core.array], "
          "list[mlx.core.array | None]]"),
      R"(Fused SGD step of many tensors: grouped by dtype, chunked into
primitives of ``tensors_per_primitive`` tensors each.)");
}

// The update of many tensors with the schedule folded in.
void bind_sgd_update_many_scheduled(nb::module_& m) {
  m.def(
      "sgd_update_many_scheduled",
      [](const std::vector<mx::array>& params,
         const std::vector<mx::array>& grads,
         const std::vector<mx::array>& velocities,
         const mx::array& step,
         double init,
         double decay_rate,
         int64_t step_size,
         double momentum,
         double weight_decay,
         double dampening,
         bool nesterov,
         bool maximize,
         const OptionalArray& grad_scale,
         const OptionalArray& skip,
         const OptionalArray& clip_factor,
         const std::optional<OptionalArrays>& master_params,
         std::optional<uint64_t> rounding_seed,
         const OptionalArray& rounding_step,
         int tensors_per_primitive,
         mx::StreamOrDevice s) {
        auto r = mfs::sgd_update_many_scheduled(
            params,
            grads,
            velocities,
            step,
            {init, decay_rate, step_size},
            many_settings(
                momentum,
                weight_decay,
                dampening,
                nesterov,
                maximize,
                grad_scale,
                skip,
                clip_factor,
                master_params,
                rounding_seed,
                rounding_step),
            tensors_per_primitive,
            s);
        return many_result(std::move(r));
      },
      "params"_a,
      "grads"_a,
      "velocities"_a,
      nb::kw_only(),
      "step"_a,
      "init"_a,
      "decay_rate"_a,
      "step_size"_a,
      "momentum"_a = 0.0,
      "weight_decay"_a = 0.0,
      "dampening"_a = 0.0,
      "nesterov"_a = false,
      "maximize"_a = false,
      "grad_scale"_a = nb::none(),
      "skip"_a = nb::none(),
      "clip_factor"_a = nb::none(),
      "master_params"_a = nb::none(),
      "rounding_seed"_a = nb::none(),
      "rounding_step"_a = nb::none(),
      "tensors_per_primitive"_a = mfs::kDefaultTensorsPerPrimitive,
      "stream"_a = nb::none(),
      nb::sig(
          "def sgd_update_many_scheduled(params: list[mlx.core.array], "
          "grads: list[mlx.core.array], velocities: list[mlx.core.array], *, "
          "step: mlx.core.array, init: float, decay_rate: float, "
          "step_size: int, momentum: float = 0.0, weight_decay: float = 0.0, "
          "dampening: float = 0.0, nesterov: bool = False, maximize: bool = "
          "False, "
          "grad_scale: mlx.core.array | None = None, "
          "skip: mlx.core.array | None = None, "
          "clip_factor: mlx.core.array | None = None, "
          "master_params: list[mlx.core.array | None] | None = None, "
          "rounding_seed: int | None = None, "
          "rounding_step: mlx.core.array | None = None, "
          "tensors_per_primitive: int = 4, "
          "stream: mlx.core.Stream | mlx.core.Device | None = None) "
          "-> tuple[list[mlx.core.array], list[mlx.core.array], "
          "list[mlx.core.array | None]]"),
      R"(Fused SGD step of many tensors with the step-decay learning rate
computed in the kernel from the integer ``step`` counter.)");
}

// The composed fallbacks (stock MLX ops), for tests.
void bind_fallbacks(nb::module_& m) {
  // The composed fallback (stock MLX ops) that GPU streams take in builds
  // without Metal kernels, callable on any device so that tests can check it
  // against the primitives.
  m.def(
      "_step_decay_lr_fallback",
      [](const mx::array& step,
         double init,
         double decay_rate,
         int64_t step_size,
         mx::StreamOrDevice s) {
        mfs::StepDecay schedule{init, decay_rate, step_size};
        schedule.validate();
        mfs::check_step_array(step, step_size, "step");
        return mfs::step_decay_lr_composed(step, schedule, s);
      },
      "step"_a,
      "init"_a,
      "decay_rate"_a,
      "step_size"_a,
      nb::kw_only(),
      "stream"_a = nb::none());

  m.def(
      "_grads_sq_norm_fallback",
      [](const std::vector<mx::array>& grads, mx::StreamOrDevice s) {
        return mfs::grads_sq_norm(grads, mfs::kDefaultTensorsPerCheck, s, true);
      },
      "grads"_a,
      nb::kw_only(),
      "stream"_a = nb::none());

  m.def(
      "_grads_nonfinite_fallback",
      [](const std::vector<mx::array>& grads, mx::StreamOrDevice s) {
        return mfs::grads_nonfinite(
            grads, mfs::kDefaultTensorsPerCheck, s, true);
      },
      "grads"_a,
      nb::kw_only(),
      "stream"_a = nb::none());

  m.def(
      "_sgd_update_many_fallback",
      [](const std::vector<mx::array>& params,
         const std::vector<mx::array>& grads,
         const std::vector<mx::array>& velocities,
         const std::optional<mx::array>& learning_rate,
         const std::optional<mx::array>& step,
         double init,
         double decay_rate,
         int64_t step_size,
         double momentum,
         double weight_decay,
         double dampening,
         bool nesterov,
         bool maximize,
         const OptionalArray& grad_scale,
         const OptionalArray& skip,
         const OptionalArray& clip_factor,
         const std::optional<OptionalArrays>& master_params,
         std::optional<uint64_t> rounding_seed,
         const OptionalArray& rounding_step,
         mx::StreamOrDevice s) {
        auto settings = many_settings(
            momentum,
            weight_decay,
            dampening,
            nesterov,
            maximize,
            grad_scale,
            skip,
            clip_factor,
            master_params,
            rounding_seed,
            rounding_step);
        auto r = step ? mfs::sgd_update_many_scheduled(
                            params,
                            grads,
                            velocities,
                            *step,
                            {init, decay_rate, step_size},
                            settings,
                            mfs::kDefaultTensorsPerPrimitive,
                            s,
                            true)
                      : mfs::sgd_update_many(
                            params,
                            grads,
                            velocities,
                            learning_rate.value(),
                            settings,
                            mfs::kDefaultTensorsPerPrimitive,
                            s,
                            true);
        return many_result(std::move(r));
      },
      "params"_a,
      "grads"_a,
      "velocities"_a,
      nb::kw_only(),
      "learning_rate"_a = nb::none(),
      "step"_a = nb::none(),
      "init"_a = 0.0,
      "decay_rate"_a = 1.0,
      "step_size"_a = 1,
      "momentum"_a = 0.0,
      "weight_decay"_a = 0.0,
      "dampening"_a = 0.0,
      "nesterov"_a = false,
      "maximize"_a = false,
      "grad_scale"_a = nb::none(),
      "skip"_a = nb::none(),
      "clip_factor"_a = nb::none(),
      "master_params"_a = nb::none(),
      "rounding_seed"_a = nb::none(),
      "rounding_step"_a = nb::none(),
      "stream"_a = nb::none());
}

} // namespace

NB_MODULE(_ext, m) {
  m.doc() = "C++ MLX primitives of mlx_fused_sgd (step decay, fused SGD).";

  // The MLX release whose headers this extension was compiled against.
  m.attr("mlx_build_version") = MFS_STR(MLX_VERSION_MAJOR) "." MFS_STR(
      MLX_VERSION_MINOR) "." MFS_STR(MLX_VERSION_PATCH);
  m.attr("DEFAULT_TENSORS_PER_PRIMITIVE") = mfs::kDefaultTensorsPerPrimitive;

  bind_backend(m);
  bind_step_decay(m);
  bind_grad_check(m);
  bind_sgd_update(m);
  bind_sgd_update_scheduled(m);
  bind_sgd_update_many(m);
  bind_sgd_update_many_scheduled(m);
  bind_fallbacks(m);
  mfs::bind_tree(m);
}
