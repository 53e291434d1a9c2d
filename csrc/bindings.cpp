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

using OptionalArrays = std::vector<OptionalArray>;

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

// The options of an update, as one value, and the update itself: one binding
// for every way the Python functions call it.
void bind_sgd_update(nb::module_& m) {
  nb::class_<mfs::SGDSettings>(
      m,
      "SGDSettings",
      "Every option of one update (the hyperparameters as Python floats, "
      "the device scalars, the half-precision storage options); "
      "validate() raises ValueError naming the first bad hyperparameter.")
      .def(
          "__init__",
          [](mfs::SGDSettings* self,
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
            new (self) mfs::SGDSettings{
                momentum,
                weight_decay,
                dampening,
                nesterov,
                maximize,
                grad_scale,
                skip,
                clip_factor,
                master_params.value_or(OptionalArrays{}),
                rounding_seed,
                rounding_step};
          },
          nb::kw_only(),
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
          "rounding_step"_a = nb::none())
      .def_rw("momentum", &mfs::SGDSettings::momentum)
      .def_rw("weight_decay", &mfs::SGDSettings::weight_decay)
      .def_rw("dampening", &mfs::SGDSettings::dampening)
      .def_rw("nesterov", &mfs::SGDSettings::nesterov)
      .def_rw("maximize", &mfs::SGDSettings::maximize)
      .def_rw("grad_scale", &mfs::SGDSettings::grad_scale)
      .def_rw("skip", &mfs::SGDSettings::skip)
      .def_rw("clip_factor", &mfs::SGDSettings::clip_factor)
      .def_rw("master_params", &mfs::SGDSettings::master_params)
      .def_rw("rounding_seed", &mfs::SGDSettings::rounding_seed)
      .def_rw("rounding_step", &mfs::SGDSettings::rounding_step)
      .def("validate", &mfs::SGDSettings::validate);

  m.def(
      "sgd_update",
      [](const std::vector<mx::array>& params,
         const std::vector<mx::array>& grads,
         const std::vector<mx::array>& velocities,
         const mfs::SGDSettings& settings,
         const OptionalArray& learning_rate,
         const OptionalArray& step,
         const std::optional<std::tuple<double, double, int64_t>>& schedule,
         int tensors_per_primitive,
         bool fallback,
         mx::StreamOrDevice s) {
        const bool scheduled = step.has_value() || schedule.has_value();
        if (learning_rate.has_value() == scheduled ||
            (scheduled && !(step && schedule))) {
          throw std::invalid_argument(
              "pass learning_rate, or step and schedule (not both).");
        }
        std::optional<mfs::StepDecay> decay;
        if (schedule) {
          auto [init, decay_rate, step_size] = *schedule;
          decay = mfs::StepDecay{init, decay_rate, step_size};
        }
        auto r = mfs::sgd_update(
            params,
            grads,
            velocities,
            {learning_rate ? *learning_rate : *step, decay},
            settings,
            tensors_per_primitive,
            s,
            fallback);
        return std::make_tuple(
            std::move(r.params),
            std::move(r.velocities),
            std::move(r.master_params));
      },
      "params"_a,
      "grads"_a,
      "velocities"_a,
      "settings"_a,
      nb::kw_only(),
      "learning_rate"_a = nb::none(),
      "step"_a = nb::none(),
      "schedule"_a = nb::none(),
      "tensors_per_primitive"_a = mfs::kDefaultTensorsPerPrimitive,
      "fallback"_a = false,
      "stream"_a = nb::none(),
      nb::sig(
          "def sgd_update(params: list[mlx.core.array], "
          "grads: list[mlx.core.array], velocities: list[mlx.core.array], "
          "settings: SGDSettings, *, "
          "learning_rate: mlx.core.array | None = None, "
          "step: mlx.core.array | None = None, "
          "schedule: tuple[float, float, int] | None = None, "
          "tensors_per_primitive: int = 4, fallback: bool = False, "
          "stream: mlx.core.Stream | mlx.core.Device | None = None) "
          "-> tuple[list[mlx.core.array], list[mlx.core.array], "
          "list[mlx.core.array | None]]"),
      R"(The fused SGD step of many tensors: grouped by dtype, chunked into
primitives of ``tensors_per_primitive`` tensors each. The learning rate is
``learning_rate`` (a scalar array), or the step-decay ``schedule`` (init,
decay_rate, step_size) of the integer ``step`` counter, computed in the
kernel. ``fallback`` composes the update of stock MLX ops instead (for
tests). Returns the new params, the new momentum buffers (the given ones
when momentum is 0) and the new master copies (None where a param has
none).)");
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
  bind_fallbacks(m);
  mfs::bind_tree(m);
}
