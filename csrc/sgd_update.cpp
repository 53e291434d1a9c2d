#include "sgd_update.h"

#include <cmath>
#include <map>
#include <sstream>
#include <stdexcept>
#include <tuple>
#include <utility>

#include "utils.h"

namespace mlx_fused_sgd {

// ---------------------------------------------------------------------------
// Settings and validation
// ---------------------------------------------------------------------------

void SGDSettings::validate() const {
  auto fail = [](const std::string& msg) { throw std::invalid_argument(msg); };
  std::ostringstream os;
  // The kernels compute with float32(momentum) and float32(weight_decay):
  // a value that overflows float32 would be inf there.
  if (!std::isfinite(static_cast<float>(momentum)) || momentum < 0) {
    os << "momentum must be a finite number >= 0 that fits in float32, but "
          "got "
       << momentum << ".";
    fail(os.str());
  }
  if (!std::isfinite(static_cast<float>(weight_decay))) {
    os << "weight_decay must be a finite number that fits in float32, but got "
       << weight_decay << ".";
    fail(os.str());
  }
  if (!(dampening >= 0 && dampening <= 1)) {
    os << "dampening must be in [0, 1], but got " << dampening << ".";
    fail(os.str());
  }
  if (nesterov && (momentum <= 0 || dampening != 0)) {
    fail("Nesterov momentum requires a momentum and zero dampening.");
  }
}

namespace {

bool is_supported_float(mx::Dtype dtype) {
  return dtype == mx::float32 || dtype == mx::float16 || dtype == mx::bfloat16;
}

std::string indexed(const char* what, size_t i, size_t n) {
  if (n == 1) {
    return what;
  }
  return std::string(what) + "[" + std::to_string(i) + "]";
}

// Whether an array of `from` shape broadcasts to `to` without changing it.
bool broadcasts_to(const mx::Shape& from, const mx::Shape& to) {
  if (from.size() > to.size()) {
    return false;
  }
  for (size_t d = 1; d <= from.size(); ++d) {
    const auto f = from[from.size() - d];
    if (f != 1 && f != to[to.size() - d]) {
      return false;
    }
  }
  return true;
}

// Checks one (param, grad, velocity) triple; returns the grad as the kernel
// reads it: widened to float32 for a float32 param, broadcast to the param's
// shape where stock would broadcast it.
mx::array check_tensor(
    const mx::array& param,
    const mx::array& grad,
    const mx::array* velocity,
    bool weight_decay,
    size_t i,
    size_t n,
    mx::StreamOrDevice s) {
  // Names are built only for an error message: this runs per tensor per step.
  auto pname = [&] { return indexed("param", i, n); };
  auto gname = [&] { return indexed("grad", i, n); };
  auto vname = [&] { return indexed("velocity", i, n); };
  // float64: stock's own ops, in double (uses_stock_ops); MLX has float64
  // on the CPU only. Any floating gradient and buffer: stock's ops promote
  // them to the param's dtype.
  const bool f64 = param.dtype() == mx::float64;
  if (f64 && mx::to_stream(s).device != mx::Device::cpu) {
    throw std::invalid_argument(
        pname() +
        " has dtype float64, which MLX computes on the CPU only: update it on "
        "the CPU (stream=mx.cpu) or cast it to float32.");
  }
  if (f64 &&
      (!mx::issubdtype(grad.dtype(), mx::floating) ||
       (velocity != nullptr &&
        !mx::issubdtype(velocity->dtype(), mx::floating)))) {
    throw std::invalid_argument(
        gname() + " has dtype " + dtype_name(grad.dtype()) +
        (velocity != nullptr
             ? " and " + vname() + " " + dtype_name(velocity->dtype())
             : std::string()) +
        "; a float64 param takes floating-point gradients and momentum "
        "buffers.");
  }
  if (!f64 && !is_supported_float(param.dtype())) {
    throw std::invalid_argument(
        pname() + " has dtype " + dtype_name(param.dtype()) +
        "; the fused SGD update supports float32, float16 and bfloat16 (and "
        "float64 on the CPU).");
  }
  // A float16/bfloat16 gradient of a float32 param: with weight decay it is
  // widened, exactly, as stock's first op (g + wd * p) promotes it (same
  // bits); without, stock computes in the gradient's dtype and so does
  // update_with_stock_ops. Any other mix would make stock promote the param
  // itself to another dtype: refused.
  const bool half_grad = grad.dtype() != param.dtype() &&
                         param.dtype() == mx::float32 &&
                         is_supported_float(grad.dtype());
  const bool widened = half_grad && weight_decay;
  if (!f64 && grad.dtype() != param.dtype() && !half_grad) {
    throw std::invalid_argument(
        gname() + " has dtype " + dtype_name(grad.dtype()) + " but " + pname() +
        " has dtype " + dtype_name(param.dtype()) +
        "; the update keeps the parameter's dtype, so the gradient must have "
        "it (or be float16/bfloat16 for a float32 parameter): cast the "
        "gradient to the parameter's dtype.");
  }
  if (velocity != nullptr) {
    // The momentum buffer has the param's dtype, or float32 for a half
    // param (state_dtype=float32: the buffer keeps full precision), or the
    // gradient's half dtype where the update is computed in it (stock makes
    // its buffers from the gradients).
    // A float16/bfloat16 buffer of a float32 param (made from half
    // gradients, then given float32 ones or weight decay) is accepted as
    // stock accepts it: update_with_stock_ops widens it, as stock's ops do.
    if (!f64 && velocity->dtype() != param.dtype() &&
        !(velocity->dtype() == mx::float32 && param.dtype() != mx::float32) &&
        !(param.dtype() == mx::float32 &&
          (velocity->dtype() == mx::float16 ||
           velocity->dtype() == mx::bfloat16))) {
      throw std::invalid_argument(
          vname() + " has dtype " + dtype_name(velocity->dtype()) + " but " +
          pname() + " has dtype " + dtype_name(param.dtype()) +
          "; the momentum buffer must have the parameter's dtype (or float32 "
          "for a float16/bfloat16 parameter, or float16/bfloat16 for a "
          "float32 parameter).");
    }
    // Stock initializes its buffers from the gradient tree: a broadcast
    // gradient's buffer keeps the gradient's shape (without weight decay),
    // and stock checkpoints hold it so. Read as broadcast to the param.
    if (!broadcasts_to(velocity->shape(), param.shape())) {
      throw std::invalid_argument(
          vname() + " has shape " + shape_str(velocity->shape()) + " but " +
          pname() + " has shape " + shape_str(param.shape()) +
          "; the momentum buffer must have the parameter's shape (or "
          "broadcast to it).");
    }
  }
  const mx::array g = widened ? mx::astype(grad, mx::float32, s) : grad;
  if (g.shape() == param.shape()) {
    return g;
  }
  // Stock `param - lr * grad` broadcasts a gradient to the parameter's shape;
  // the other way round would change the parameter's shape, so it is refused.
  if (!broadcasts_to(grad.shape(), param.shape())) {
    throw std::invalid_argument(
        gname() + " has shape " + shape_str(grad.shape()) + " but " + pname() +
        " has shape " + shape_str(param.shape()) +
        "; a gradient must have the parameter's shape or broadcast to it.");
  }
  return mx::broadcast_to(g, param.shape(), s);
}

// A skip flag (any integer or bool scalar, nonzero: skip) as the uint32 0-d
// array the kernels read.
mx::array check_skip_flag(const mx::array& x, mx::StreamOrDevice s) {
  if (x.size() != 1 ||
      !(mx::issubdtype(x.dtype(), mx::integer) || x.dtype() == mx::bool_)) {
    throw std::invalid_argument(
        "skip must be a boolean or integer scalar (as returned by "
        "grads_nonfinite), but got dtype " +
        dtype_name(x.dtype()) + " and shape " + shape_str(x.shape()) + ".");
  }
  // Nonzero of any width skips (a cast to uint32 would drop the high bits
  // of a 64-bit flag).
  auto out = x.dtype() == mx::uint32 || x.dtype() == mx::bool_
                 ? x
                 : mx::not_equal(x, mx::array(0, x.dtype()), s);
  out = out.dtype() == mx::uint32 ? out : mx::astype(out, mx::uint32, s);
  return out.ndim() == 0 ? out : mx::reshape(out, {}, s);
}

// Checks master copy i (master weights): a float32 array with the shape of a
// float16/bfloat16 param.
void check_master(
    const mx::array& param, const mx::array& master, size_t i, size_t n) {
  const auto mname = indexed("master_params", i, n);
  if (param.dtype() == mx::float32) {
    throw std::invalid_argument(
        mname + " is given for a float32 param; master copies are for "
                "float16 and bfloat16 params (pass None for this one).");
  }
  if (master.dtype() != mx::float32) {
    throw std::invalid_argument(
        mname + " has dtype " + dtype_name(master.dtype()) +
        "; a master copy must be float32.");
  }
  if (master.shape() != param.shape()) {
    throw std::invalid_argument(
        mname + " has shape " + shape_str(master.shape()) + " but " +
        indexed("param", i, n) + " has shape " + shape_str(param.shape()) +
        "; a master copy must have the parameter's shape.");
  }
}

// The rounding step (stochastic rounding) as the uint64 0-d array the kernels
// read.
mx::array check_rounding_step(const mx::array& x, mx::StreamOrDevice s) {
  if (x.size() != 1 || !mx::issubdtype(x.dtype(), mx::integer)) {
    throw std::invalid_argument(
        "rounding_step must be an integer scalar (the optimizer's step "
        "counter), but got dtype " +
        dtype_name(x.dtype()) + " and shape " + shape_str(x.shape()) + ".");
  }
  auto out = x.dtype() == mx::uint64 ? x : mx::astype(x, mx::uint64, s);
  return out.ndim() == 0 ? out : mx::reshape(out, {}, s);
}

// A real scalar array as the float32 0-d array the kernels read.
mx::array
check_real_scalar(const mx::array& x, const char* name, mx::StreamOrDevice s) {
  if (x.size() != 1) {
    throw std::invalid_argument(
        std::string(name) + " must be a scalar, but got an array of shape " +
        shape_str(x.shape()) + ".");
  }
  if (!mx::issubdtype(x.dtype(), mx::integer) &&
      !mx::issubdtype(x.dtype(), mx::floating)) {
    throw std::invalid_argument(
        std::string(name) + " must be a real number, but got dtype " +
        dtype_name(x.dtype()) + ".");
  }
  auto out = x.dtype() == mx::float32 ? x : mx::astype(x, mx::float32, s);
  return out.ndim() == 0 ? out : mx::reshape(out, {}, s);
}

// math::hash32 on a uint32 array, from stock ops (uint32 arithmetic wraps).
mx::array hash32_composed(mx::array x, mx::StreamOrDevice s) {
  auto u32 = [](uint32_t c) { return mx::array(c, mx::uint32); };
  auto xorshift = [&](const mx::array& a, uint32_t k) {
    return mx::bitwise_xor(a, mx::right_shift(a, u32(k), s), s);
  };
  x = mx::multiply(xorshift(x, 16), u32(0x7feb352du), s);
  x = mx::multiply(xorshift(x, 15), u32(0x846ca68bu), s);
  return xorshift(x, 16);
}

// math::round_bf16_stochastic of a float32 array, with the random bits of
// math::rounding_stream and math::rounding_bits, from stock ops: the
// fallback's stochastic rounding, bit for bit the kernels'.
mx::array round_bf16_stochastic_composed(
    const mx::array& x,
    uint64_t seed,
    const mx::array& step,
    uint64_t tensor,
    mx::StreamOrDevice s) {
  auto u32 = [](uint32_t c) { return mx::array(c, mx::uint32); };
  auto host_hash = [](uint32_t v) { return math::hash32(v); };
  // rounding_stream: the seed's part on the host, the step's on the device.
  const uint32_t a =
      host_hash(uint32_t(seed) ^ host_hash(uint32_t(seed >> 32)));
  auto step_lo = mx::astype(step, mx::uint32, s);
  auto step_hi = mx::astype(
      mx::right_shift(step, mx::array(uint64_t(32)), s), mx::uint32, s);
  auto b = hash32_composed(mx::bitwise_xor(u32(a), step_lo, s), s);
  b = hash32_composed(mx::bitwise_xor(b, step_hi, s), s);
  auto c = hash32_composed(
      mx::bitwise_xor(b, u32(uint32_t(tensor) ^ 0x9e3779b9u), s), s);
  auto d =
      hash32_composed(mx::bitwise_xor(c, u32(uint32_t(tensor >> 32)), s), s);
  // rounding_bits of every element's row-major index (stream: hi c, lo d).
  const int64_t n = static_cast<int64_t>(x.size());
  auto index = mx::arange(0.0, static_cast<double>(n), 1.0, mx::uint64, s);
  auto index_lo = mx::astype(index, mx::uint32, s);
  auto index_hi = mx::astype(
      mx::right_shift(index, mx::array(uint64_t(32)), s), mx::uint32, s);
  auto h = mx::add(
      mx::add(mx::bitwise_xor(index_lo, d, s), c, s),
      mx::multiply(index_hi, u32(0x9e3779b9u), s),
      s);
  auto random16 = mx::reshape(
      mx::right_shift(hash32_composed(h, s), u32(16), s), x.shape(), s);
  auto bits = mx::view(x, mx::uint32, s);
  bits = mx::bitwise_and(mx::add(bits, random16, s), u32(0xffff0000u), s);
  return mx::where(mx::isfinite(x, s), mx::view(bits, mx::float32, s), x, s);
}

// The hyperparameters as Python gave them: stock's scalars meet a float64
// array unrounded (SGDHyper holds their float32 roundings for the kernels).
struct ExactHyper {
  double momentum;
  double weight_decay;
  double dampening_scale; // 1 - dampening, in double as Python computes it
};

// Whether tensor i of an update runs stock's own ops rather than the kernel:
// where stock computes in mixed dtypes. A float16/bfloat16 gradient of a
// float32 param without weight decay (with weight decay, stock's first op,
// g + wd * p, is float32 and so is the rest) is computed in the gradient's
// dtype; a float16/bfloat16 momentum buffer of a float32 param (made from
// such gradients, then given float32 ones or weight decay) is widened by
// stock's first momentum op; float64 params are computed in double.
bool uses_stock_ops(
    const mx::array& param,
    const mx::array& grad,
    const mx::array* velocity,
    const SGDVariant& v) {
  // float64 (the CPU only): stock's own ops compute it in double.
  if (param.dtype() == mx::float64) {
    return true;
  }
  if (!v.weight_decay() && grad.dtype() != param.dtype()) {
    return true;
  }
  return v.momentum && velocity != nullptr &&
      velocity->dtype() != param.dtype() && param.dtype() == mx::float32;
}

// Stock's update of such a tensor, op for op, so its bits are stock's: a
// missing momentum buffer is made from the gradient (its dtype), each Python
// scalar takes the dtype of the array it meets (as MLX converts it: rounded to
// float32 first, unrounded for float64), the learning rate is cast to the
// (weight-decayed) gradient's dtype, and MLX's promotion does the rest. Not
// fused: these are stock's own ops. This package's options act first on the
// gradient, in float32 (a loss scale may not fit in float16; float64 for a
// float64 gradient), rounded back to its dtype.
// Returns the new param and, with momentum, the new buffer.
std::pair<mx::array, std::optional<mx::array>> update_with_stock_ops(
    const mx::array& param,
    const mx::array& grad,
    const mx::array* velocity,
    const mx::array& lr,
    const mx::array& grad_scale,
    const mx::array& clip_factor,
    const mx::array& skip_flag,
    const SGDVariant& v,
    const ExactHyper& exact,
    mx::StreamOrDevice s) {
  const auto dtype = grad.dtype();
  // float32 for the options' arithmetic, float64 for a float64 gradient.
  const auto wide_dtype = dtype == mx::float64 ? mx::float64 : mx::float32;
  auto g = grad;
  if (v.scale_grad()) {
    auto divisor =
        v.maximize ? mx::multiply(grad_scale, mx::array(-1.0f), s) : grad_scale;
    auto wide = mx::divide(
        mx::astype(g, wide_dtype, s), mx::astype(divisor, wide_dtype, s), s);
    if (v.clip) {
      wide = mx::multiply(wide, mx::astype(clip_factor, wide_dtype, s), s);
    }
    g = mx::astype(wide, dtype, s);
  }
  auto keep_if_skipped = [&](mx::array updated, const mx::array& old) {
    return v.skip ? mx::where(skip_flag, old, updated, s) : updated;
  };
  // A Python scalar meeting an array, as MLX converts it: unrounded for a
  // float64 array, else rounded to float32 and then to the array's dtype.
  auto weak = [](double x, mx::Dtype like) {
    return like == mx::float64 ? mx::array(x, mx::float64)
                               : mx::array(static_cast<float>(x), like);
  };
  if (v.weight_decay()) {
    // gradient += weight_decay * parameter: the param's dtype from here on.
    g = mx::add(
        g, mx::multiply(weak(exact.weight_decay, param.dtype()), param, s), s);
  }
  const auto lr_in_dtype = mx::astype(lr, g.dtype(), s);
  if (!v.momentum) {
    auto updated = mx::subtract(param, mx::multiply(lr_in_dtype, g, s), s);
    return {keep_if_skipped(updated, param), std::nullopt};
  }
  const auto old_vel =
      velocity ? *velocity : mx::zeros(param.shape(), dtype, s);
  auto vel = mx::multiply(weak(exact.momentum, old_vel.dtype()), old_vel, s);
  vel = mx::add(
      vel,
      v.dampening() ? mx::multiply(weak(exact.dampening_scale, g.dtype()), g, s)
                  : g,
      s);
  auto update = v.nesterov()
      ? mx::add(
            g, mx::multiply(weak(exact.momentum, vel.dtype()), vel, s), s)
      : vel;
  auto updated = mx::subtract(param, mx::multiply(lr_in_dtype, update, s), s);
  return {keep_if_skipped(updated, param), keep_if_skipped(vel, old_vel)};
}

// The update from stock MLX ops, with the kernels' semantics (float32
// intermediates, one rounding to the param dtype): the fallback for devices
// without a kernel of this package.
SGDResult sgd_update_composed(
    const std::vector<mx::array>& params,
    const std::vector<mx::array>& grads,
    const std::vector<mx::array>& velocities,
    const mx::array& lr_input,
    const std::optional<StepDecay>& schedule,
    const mx::array& grad_scale,
    const mx::array& skip_flag,
    const mx::array& clip_factor,
    const std::vector<std::optional<mx::array>>& masters,
    const std::optional<uint64_t>& rounding_seed,
    const mx::array& rounding_step,
    const SGDVariant& v,
    const ExactHyper& exact,
    mx::StreamOrDevice s) {
  auto lr =
      schedule ? step_decay_lr_composed(lr_input, *schedule, s) : lr_input;
  auto scalar = [](float x) { return mx::array(x); };
  // Negating the divisor negates the quotient exactly (maximize).
  auto divisor =
      v.maximize ? mx::multiply(grad_scale, scalar(-1.0f), s) : grad_scale;
  SGDResult result;
  result.master_params = masters;
  for (size_t i = 0; i < params.size(); ++i) {
    if (uses_stock_ops(
            params[i],
            grads[i],
            velocities.empty() ? nullptr : &velocities[i],
            v)) {
      auto [param, vel] = update_with_stock_ops(
          params[i],
          grads[i],
          velocities.empty() ? nullptr : &velocities[i],
          lr,
          grad_scale,
          clip_factor,
          skip_flag,
          v,
          exact,
          s);
      result.params.push_back(param);
      if (v.momentum) {
        result.velocities.push_back(*vel);
      }
      continue;
    }
    auto dtype = params[i].dtype();
    const auto* master =
        masters.empty() || !masters[i] ? nullptr : &*masters[i];
    // A master copy the param no longer rounds from (the param changed
    // outside the optimizer) gives way to the param: math::master_or_param.
    auto p = mx::astype(params[i], mx::float32, s);
    if (master) {
      p = mx::where(
          mx::equal(mx::astype(*master, dtype, s), params[i], s),
          *master,
          p,
          s);
    }
    auto g = mx::astype(grads[i], mx::float32, s);
    if (v.scale_grad()) {
      g = mx::divide(g, divisor, s);
      if (v.clip) {
        g = mx::multiply(g, clip_factor, s);
      }
    }
    if (v.weight_decay()) {
      g = mx::add(g, mx::multiply(scalar(v.hyper.weight_decay), p, s), s);
    }
    // A skipped step keeps the old values (skip_nonfinite).
    auto keep_if_skipped = [&](mx::array updated, const mx::array& old) {
      return v.skip ? mx::where(skip_flag, old, updated, s) : updated;
    };
    // The new float32 param: to the master copy (if any), rounded to the
    // param.
    auto store = [&](const mx::array& updated) {
      if (master) {
        result.master_params[i] = keep_if_skipped(updated, *master);
      }
      auto stored = updated;
      if (rounding_seed && !master && dtype == mx::bfloat16) {
        stored = round_bf16_stochastic_composed(
            updated, *rounding_seed, rounding_step, i, s);
      }
      result.params.push_back(
          keep_if_skipped(mx::astype(stored, dtype, s), params[i]));
    };
    if (!v.momentum) {
      store(mx::subtract(p, mx::multiply(lr, g, s), s));
      continue;
    }
    auto old_vel =
        velocities.empty() ? mx::zeros_like(params[i], s) : velocities[i];
    auto vel = mx::astype(old_vel, mx::float32, s);
    vel = mx::multiply(scalar(v.hyper.momentum), vel, s);
    vel = mx::add(
        vel,
        v.dampening() ? mx::multiply(scalar(v.hyper.dampening_scale), g, s) : g,
        s);
    auto update =
        v.nesterov()
            ? mx::add(g, mx::multiply(scalar(v.hyper.momentum), vel, s), s)
            : vel;
    store(mx::subtract(p, mx::multiply(lr, update, s), s));
    result.velocities.push_back(
        keep_if_skipped(mx::astype(vel, old_vel.dtype(), s), old_vel));
  }
  if (!v.momentum) {
    result.velocities = velocities;
  }
  return result;
}

SGDResult sgd_update_impl(
    const std::vector<mx::array>& params,
    const std::vector<mx::array>& grads,
    const std::vector<mx::array>& velocities_in,
    const mx::array& lr_input,
    const std::optional<StepDecay>& schedule,
    const SGDSettings& settings,
    int tensors_per_primitive,
    bool use_fallback,
    mx::StreamOrDevice s) {
  settings.validate();
  if (tensors_per_primitive < 1 ||
      tensors_per_primitive > kMaxTensorsPerPrimitive) {
    throw std::invalid_argument(
        "tensors_per_primitive must be in [1, " +
        std::to_string(kMaxTensorsPerPrimitive) + "], but got " +
        std::to_string(tensors_per_primitive) + ".");
  }
  const size_t n = params.size();
  if (grads.size() != n) {
    throw std::invalid_argument(
        "params and grads must have the same length, but got " +
        std::to_string(n) + " params and " + std::to_string(grads.size()) +
        " grads.");
  }
  const auto variant = SGDVariant::from(settings, settings.inputs());
  const ExactHyper exact{
      settings.momentum, settings.weight_decay, 1.0 - settings.dampening};
  const auto grad_scale =
      settings.grad_scale
          ? check_real_scalar(*settings.grad_scale, "grad_scale", s)
          : mx::array(1.0f);
  const auto skip_flag = settings.skip ? check_skip_flag(*settings.skip, s)
                                       : mx::array(0u, mx::uint32);
  const auto clip_factor =
      settings.clip_factor
          ? check_real_scalar(*settings.clip_factor, "clip_factor", s)
          : mx::array(1.0f);
  const bool have_velocities = !velocities_in.empty();
  if (have_velocities && velocities_in.size() != n) {
    throw std::invalid_argument(
        "velocities must be empty or have one entry per param, but got " +
        std::to_string(velocities_in.size()) + " for " + std::to_string(n) +
        " params.");
  }
  const auto& masters = settings.master_params;
  const bool have_masters = !masters.empty();
  if (have_masters && masters.size() != n) {
    throw std::invalid_argument(
        "master_params must be empty or have one entry per param, but got " +
        std::to_string(masters.size()) + " for " + std::to_string(n) +
        " params.");
  }
  const bool stochastic = settings.rounding_seed.has_value();
  if (stochastic && !settings.rounding_step) {
    throw std::invalid_argument(
        "stochastic rounding needs rounding_step (the step counter its "
        "random bits derive from).");
  }
  const auto rounding_step =
      stochastic ? check_rounding_step(*settings.rounding_step, s)
                 : mx::array(0u, mx::uint64);
  // How tensor i's new param is stored.
  auto rounding_of = [&](size_t i) {
    if (have_masters && masters[i]) {
      return math::kMasterWeights;
    }
    if (stochastic && params[i].dtype() == mx::bfloat16) {
      return math::kRoundStochastic;
    }
    return math::kRoundNearest;
  };

  // Validate everything before building any graph node.
  std::vector<mx::array> checked_grads;
  checked_grads.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    checked_grads.push_back(check_tensor(
        params[i],
        grads[i],
        have_velocities ? &velocities_in[i] : nullptr,
        variant.weight_decay(),
        i,
        n,
        s));
    if (have_masters && masters[i]) {
      if (stochastic) {
        throw std::invalid_argument(
            "stochastic rounding and master weights are alternatives: give "
            "master_params or a rounding seed, not both.");
      }
      check_master(params[i], *masters[i], i, n);
    } else if (stochastic && params[i].dtype() == mx::float16) {
      throw std::invalid_argument(
          indexed("param", i, n) +
          " is float16; stochastic rounding is implemented for bfloat16 "
          "params (use master weights for float16).");
    }
  }

  // Momentum buffers of a broadcast shape (a stock checkpoint's), read as
  // broadcast views; their new values have the param's shape.
  std::vector<mx::array> broadcast_velocities;
  for (size_t i = 0; have_velocities && i < n; ++i) {
    if (velocities_in[i].shape() != params[i].shape()) {
      if (broadcast_velocities.empty()) {
        broadcast_velocities = velocities_in;
      }
      broadcast_velocities[i] =
          mx::broadcast_to(velocities_in[i], params[i].shape(), s);
    }
  }
  const std::vector<mx::array>& velocities =
      broadcast_velocities.empty() ? velocities_in : broadcast_velocities;

  auto stream = mx::to_stream(s);
  if (use_fallback || !has_fused_kernel(stream)) {
    return sgd_update_composed(
        params,
        checked_grads,
        velocities,
        lr_input,
        schedule,
        grad_scale,
        skip_flag,
        clip_factor,
        masters,
        settings.rounding_seed,
        rounding_step,
        variant,
        exact,
        stream);
  }

  SGDResult result;
  result.params.resize(n, mx::array(0.0f));
  if (!variant.momentum) {
    result.velocities = velocities_in;
  } else {
    result.velocities.resize(n, mx::array(0.0f));
  }
  result.master_params = masters;

  // Group by param dtype, momentum-buffer dtype and storage mode (one kernel
  // instantiation per primitive), keep order.
  auto velocity_dtype = [&](size_t i) {
    return variant.momentum && have_velocities ? velocities[i].dtype()
                                               : params[i].dtype();
  };
  std::map<std::tuple<int, int, int>, std::vector<size_t>> groups;
  std::optional<mx::array> scheduled_lr;
  for (size_t i = 0; i < n; ++i) {
    if (uses_stock_ops(
            params[i],
            checked_grads[i],
            have_velocities ? &velocities[i] : nullptr,
            variant)) {
      if (schedule && !scheduled_lr) {
        scheduled_lr = step_decay_lr_composed(lr_input, *schedule, stream);
      }
      auto [param, vel] = update_with_stock_ops(
          params[i],
          checked_grads[i],
          have_velocities ? &velocities[i] : nullptr,
          schedule ? *scheduled_lr : lr_input,
          grad_scale,
          clip_factor,
          skip_flag,
          variant,
          exact,
          stream);
      result.params[i] = param;
      if (variant.momentum) {
        result.velocities[i] = *vel;
      }
      continue;
    }
    groups[{static_cast<int>(params[i].dtype().val()),
            static_cast<int>(velocity_dtype(i).val()),
            rounding_of(i)}]
        .push_back(i);
  }
  for (auto& [key, indices] : groups) {
    auto group_variant = variant;
    group_variant.rounding = std::get<2>(key);
    const bool group_masters = group_variant.rounding == math::kMasterWeights;
    const bool group_stochastic =
        group_variant.rounding == math::kRoundStochastic;
    group_variant.seed = group_stochastic ? *settings.rounding_seed : 0;
    for (size_t start = 0; start < indices.size();
         start += tensors_per_primitive) {
      size_t end = std::min(indices.size(), start + tensors_per_primitive);
      int count = static_cast<int>(end - start);
      std::vector<mx::array> inputs;
      std::vector<mx::Shape> shapes;
      std::vector<mx::Dtype> dtypes;
      std::vector<uint64_t> tensor_ids;
      inputs.reserve(4 * count + 5);
      for (size_t k = start; k < end; ++k) {
        inputs.push_back(params[indices[k]]);
      }
      for (size_t k = start; k < end; ++k) {
        inputs.push_back(checked_grads[indices[k]]);
      }
      if (variant.momentum) {
        for (size_t k = start; k < end; ++k) {
          const auto& p = params[indices[k]];
          inputs.push_back(
              have_velocities ? velocities[indices[k]]
                              : mx::zeros(p.shape(), p.dtype(), s));
        }
      }
      if (group_masters) {
        for (size_t k = start; k < end; ++k) {
          inputs.push_back(*masters[indices[k]]);
        }
      }
      inputs.push_back(lr_input);
      if (variant.scale_grad()) {
        inputs.push_back(grad_scale);
      }
      if (variant.skip) {
        inputs.push_back(skip_flag);
      }
      if (variant.clip) {
        inputs.push_back(clip_factor);
      }
      if (group_stochastic) {
        inputs.push_back(rounding_step);
        for (size_t k = start; k < end; ++k) {
          tensor_ids.push_back(indices[k]);
        }
      }
      for (size_t k = start; k < end; ++k) {
        shapes.push_back(params[indices[k]].shape());
        dtypes.push_back(params[indices[k]].dtype());
      }
      if (variant.momentum) {
        for (size_t k = start; k < end; ++k) {
          shapes.push_back(params[indices[k]].shape());
          dtypes.push_back(velocity_dtype(indices[k]));
        }
      }
      if (group_masters) {
        for (size_t k = start; k < end; ++k) {
          shapes.push_back(params[indices[k]].shape());
          dtypes.push_back(mx::float32);
        }
      }
      auto outs = mx::array::make_arrays(
          std::move(shapes),
          dtypes,
          std::make_shared<SGDUpdate>(
              stream, count, group_variant, schedule, std::move(tensor_ids)),
          inputs);
      const int master_base = variant.momentum ? 2 * count : count;
      for (int k = 0; k < count; ++k) {
        const size_t i = indices[start + k];
        result.params[i] = outs[k];
        if (variant.momentum) {
          result.velocities[i] = outs[count + k];
        }
        if (group_masters) {
          result.master_params[i] = outs[master_base + k];
        }
      }
    }
  }
  return result;
}

} // namespace

SGDResult sgd_update(
    const std::vector<mx::array>& params,
    const std::vector<mx::array>& grads,
    const std::vector<mx::array>& velocities,
    const LearningRate& learning_rate,
    const SGDSettings& settings,
    int tensors_per_primitive,
    mx::StreamOrDevice s,
    bool use_fallback) {
  auto run = [&](const mx::array& lr,
                 const std::optional<StepDecay>& schedule,
                 const SGDSettings& with) {
    return sgd_update_impl(
        params,
        grads,
        velocities,
        lr,
        schedule,
        with,
        tensors_per_primitive,
        use_fallback,
        s);
  };
  if (!learning_rate.schedule) {
    return run(
        check_real_scalar(learning_rate.value, "learning_rate", s),
        std::nullopt,
        settings);
  }
  const StepDecay& schedule = *learning_rate.schedule;
  const mx::array& step = learning_rate.value;
  schedule.validate();
  check_step_array(step, schedule.step_size, "step");
  if (step.size() != 1) {
    throw std::invalid_argument(
        "step must be a scalar (the optimizer's step counter), but got an "
        "array of shape " +
        shape_str(step.shape()) + ".");
  }
  auto with = settings;
  if (with.rounding_seed && !with.rounding_step) {
    // Stochastic rounding draws its bits from the schedule's step counter.
    with.rounding_step = step;
  }
  if (step.dtype() != mx::uint64) {
    // The kernels fuse the schedule for the optimizer's uint64 counter; any
    // other integer step takes one extra scalar op, same numbers.
    auto lr = step_decay_lr(
        step, schedule.init, schedule.decay_rate, schedule.step_size, s);
    return run(check_real_scalar(lr, "learning_rate", s), std::nullopt, with);
  }
  return run(
      step.ndim() == 0 ? step : mx::reshape(step, {}, s), schedule, with);
}

// ---------------------------------------------------------------------------
// Transforms and graph facts
// ---------------------------------------------------------------------------

// The eval functions index inputs and outputs by the layout of this chunk.
// An evaluation that was interrupted (out of memory, say) after the sibling
// input lists were released and then retried from a sibling would see fewer
// inputs: refuse it rather than read past the end.
void SGDUpdate::check_layout(
    const std::vector<mx::array>& inputs,
    const std::vector<mx::array>& outputs) const {
  const size_t scalars = 1 + variant_.scale_grad() + variant_.skip +
                         variant_.clip + stochastic_rounding();
  if (inputs.size() != inputs_per_tensor() * num_tensors_ + scalars ||
      outputs.size() != outputs_per_tensor() * num_tensors_) {
    throw std::runtime_error(
        "mlx_fused_sgd: SGDUpdate was asked to evaluate with " +
        std::to_string(inputs.size()) + " inputs and " +
        std::to_string(outputs.size()) +
        " outputs, not its own; rebuild the update (call the optimizer "
        "again) rather than re-evaluating an interrupted one.");
  }
}

bool SGDUpdate::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const SGDUpdate&>(other);
  return num_tensors_ == o.num_tensors_ && variant_ == o.variant_ &&
         schedule_ == o.schedule_ && tensor_ids_ == o.tensor_ids_;
}

std::vector<mx::Shape>
SGDUpdate::output_shapes(const std::vector<mx::array>& inputs) {
  std::vector<mx::Shape> shapes;
  for (size_t o = 0; o < outputs_per_tensor(); ++o) {
    for (int i = 0; i < num_tensors_; ++i) {
      shapes.push_back(inputs[i].shape());
    }
  }
  return shapes;
}

} // namespace mlx_fused_sgd
