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

// How Python spells a settings field's type and its default (every field
// starts value-initialized: zero, false, None or empty).
template <typename T> struct PythonField;
template <> struct PythonField<double> {
  static constexpr const char* type = "float";
  static constexpr const char* value = "0.0";
};
template <> struct PythonField<bool> {
  static constexpr const char* type = "bool";
  static constexpr const char* value = "False";
};
template <> struct PythonField<OptionalArray> {
  static constexpr const char* type = "mlx.core.array | None";
  static constexpr const char* value = "None";
};
template <> struct PythonField<std::optional<uint64_t>> {
  static constexpr const char* type = "int | None";
  static constexpr const char* value = "None";
};
template <> struct PythonField<std::vector<OptionalArray>> {
  static constexpr const char* type = "list[mlx.core.array | None]";
  static constexpr const char* value = "[]";
};

// Applies `f(name, member)` to every field of SGDSettings, in the order of
// the lists that declare them (MFS_SGD_OPTIONS, then MFS_SGD_INPUTS).
template <typename F> void for_each_setting(F&& f) {
#define MFS_VISIT_SETTING(type, name) f(#name, &mfs::SGDSettings::name);
  MFS_SGD_OPTIONS(MFS_VISIT_SETTING)
  MFS_SGD_INPUTS(MFS_VISIT_SETTING)
#undef MFS_VISIT_SETTING
}

// SGDSettings from keyword arguments, each converted to its field's type; a
// keyword that is no field, or a value of the wrong type, raises TypeError
// naming it.
mfs::SGDSettings settings_from(const nb::kwargs& kwargs) {
  mfs::SGDSettings settings;
  size_t used = 0;
  for_each_setting([&](const char* name, auto member) {
    if (!kwargs.contains(name)) {
      return;
    }
    using Field = std::remove_reference_t<decltype(settings.*member)>;
    nb::handle value = kwargs[name];
    if (!nb::try_cast<Field>(value, settings.*member)) {
      throw nb::type_error(
          (std::string("SGDSettings: ") + name + " must be " +
           PythonField<Field>::type + ", but got " +
           nb::inst_name(value).c_str() + " " + nb::repr(value).c_str() + ".")
              .c_str());
    }
    ++used;
  });
  if (used != kwargs.size()) {
    for (auto [key, value] : kwargs) {
      bool known = false;
      for_each_setting([&](const char* name, auto) {
        known = known || nb::str(key).equal(nb::str(name));
      });
      if (!known) {
        throw nb::type_error(
            (std::string("SGDSettings got an unexpected keyword argument '") +
             nb::str(key).c_str() + "'.")
                .c_str());
      }
    }
  }
  return settings;
}

// The typed signature of SGDSettings.__init__, for its stub and help().
const char* settings_init_signature() {
  static const std::string sig = [] {
    std::string s = "def __init__(self, *";
    for_each_setting([&](const char* name, auto member) {
      using Field =
          std::remove_cvref_t<decltype(std::declval<mfs::SGDSettings&>().*
                                       member)>;
      s += std::string(", ") + name + ": " + PythonField<Field>::type +
           " = " + PythonField<Field>::value;
    });
    return s + ") -> None";
  }();
  return sig.c_str();
}

// The options of an update, as one value, and the update itself: one binding
// for every way the Python functions call it.
void bind_sgd_update(nb::module_& m) {
  auto settings = nb::class_<mfs::SGDSettings>(
      m,
      "SGDSettings",
      "Every option of one update (the hyperparameters as Python floats, "
      "the device scalars, the half-precision storage options), as keywords "
      "and attributes; validate() raises ValueError naming the first bad "
      "hyperparameter.");
  settings
      .def(
          "__init__",
          [](mfs::SGDSettings* self, const nb::kwargs& kwargs) {
            new (self) mfs::SGDSettings(settings_from(kwargs));
          },
          nb::sig(settings_init_signature()))
      .def("validate", &mfs::SGDSettings::validate);
  for_each_setting([&](const char* name, auto member) {
    settings.def_rw(name, member);
  });

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
