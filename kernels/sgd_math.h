// Per-element math of mlx-fused-sgd: the step-decay learning rate and the SGD
// update. This header is the one source of truth for every backend: the CPU
// loops in csrc/, the Metal kernels in kernels/*.metal and the CUDA kernels in
// kernels/*.cuh include it.
//
// Parity contract (docs/design.md): every line rounds to float32 exactly as
// stock mlx.optimizers.SGD rounds it. Each multiply and each add is its own
// statement so that no compiler may contract them into an FMA (contraction
// only happens inside one expression unless fast-math is on); the CPU build
// also passes -ffp-contract=off, Metal is built with -fno-fast-math and CUDA
// with --fmad=false.
#pragma once

#ifdef __METAL_VERSION__
// bfloat (and the kernels' other needs) came with Metal 3.1, macOS 14: the
// build passes -std=metal3.1; an older language fails here, not in a
// confusing error about bfloat further down.
#if __METAL_VERSION__ < 310
#error                                                                         \
    "mlx-fused-sgd's Metal kernels need Metal 3.1 or later (macOS 14): compile them with -std=metal3.1 and a deployment target of 14.0 or later"
#endif
#include <metal_stdlib>
#define MFS_INLINE inline
#define MFS_POW metal::pow
// Qualified: this header comes before the kernels' `using namespace metal`.
#define MFS_FLOAT_BITS(x) metal::as_type<uint32_t>(x)
#define MFS_BITS_FLOAT(b) metal::as_type<float>(b)
#define MFS_CONSTANT_INT constant constexpr int
// The address space of a launch's constants (a plain reference elsewhere).
#define MFS_CONSTANT constant
#elif defined(__CUDACC__)
#include <cstdint>
// Host and device: eval_gpu computes launch constants with the same code.
// powf is CUDA's in device code, as in stock MLX's CUDA power op.
#define MFS_INLINE __host__ __device__ __forceinline__
#define MFS_POW powf
#define MFS_FLOAT_BITS(x) __builtin_bit_cast(uint32_t, x)
#define MFS_BITS_FLOAT(b) __builtin_bit_cast(float, b)
#define MFS_CONSTANT_INT constexpr int
#define MFS_CONSTANT
#else
#include <cmath>
#include <cstdint>
// Always inlined: the CPU loops are compiled once per instruction set, and an
// out-of-line copy shared between them could be one the CPU cannot run.
#define MFS_INLINE inline __attribute__((always_inline))
#define MFS_POW std::pow
#define MFS_FLOAT_BITS(x) __builtin_bit_cast(uint32_t, x)
#define MFS_BITS_FLOAT(b) __builtin_bit_cast(float, b)
#define MFS_CONSTANT_INT constexpr int
#define MFS_CONSTANT
#endif

namespace mlx_fused_sgd {
namespace math {

// Integer floor division with Python semantics, exactly as mx.floor_divide on
// integers (which the stock schedule uses for `step // step_size`).
template <typename I> MFS_INLINE I floor_div(I a, I b) {
  I q = a / b;
  I r = a % b;
  // For unsigned I the sign test is always false and folds away.
  if (r != 0 && ((a < I(0)) != (b < I(0)))) {
    q = q - I(1);
  }
  return q;
}

// lr_k = float32(init) * pow(float32(decay_rate), float32(k // step_size)),
// the stock step_decay schedule evaluated on an integer step array.
template <typename I>
MFS_INLINE float
step_decay_lr(I step, I step_size, float init, float decay_rate) {
  float exponent = static_cast<float>(floor_div(step, step_size));
  float factor = MFS_POW(decay_rate, exponent);
  return init * factor;
}

// True for NaN and +-Inf: x - x is 0 for every finite x and NaN otherwise.
// Branch-free, and the same test on both backends (no isnan/isinf library
// differences); exact without fast-math, which neither backend uses.
MFS_INLINE bool is_nonfinite(float x) {
  float d = x - x;
  return !(d == 0.0f);
}

// The options of one update as the math reads them, uniform across a launch
// (hyper_of, below, makes them from the user's). The flags are run-time
// values, as in PyTorch's fused kernels: they change neither types nor
// memory traffic, so a kernel per combination would only multiply the
// instantiations. The GPU kernels read them where the launch's constants
// are, by reference (Metal copies no struct out of its constant address
// space implicitly).
struct SGDHyper {
  float weight_decay;
  float momentum;
  float dampening_scale;
  bool has_weight_decay; // weight_decay != 0
  bool has_dampening;    // dampening > 0 (with momentum)
  bool nesterov;         // with momentum
  // grad_scale, maximize or clipping (PyTorch's order: the gradient is
  // unscaled, clipped and negated before weight decay).
  bool scale_grad;
#ifndef __METAL_VERSION__
  bool operator==(const SGDHyper&) const = default;
#endif
};

// The values of one step that are read on the device when it runs (they may
// be the results of earlier ops of the same step).
struct StepScalars {
  float lr;
  // The gradient is divided by this first (scale_grad only): the loss
  // scale, negated for maximize (g / -s == -(g / s) exactly).
  float grad_divisor;
  // ... then multiplied by this (scale_grad only): the global-norm clip
  // factor, 1 without clipping (g * 1 == g exactly).
  float clip_factor;
};

#ifndef __METAL_VERSION__
// The options of the math as the user gives them (Python floats and bools,
// before any rounding), one line each, X(C++ type, name): the fields of
// SGDOptions and their Python attributes (csrc/bindings.cpp) are made from
// this list. Each defaults to zero (false).
#define MFS_SGD_OPTIONS(X)                                                    \
  X(double, momentum)                                                         \
  X(double, weight_decay)                                                     \
  X(double, dampening)                                                        \
  X(bool, nesterov)                                                           \
  X(bool, maximize) /* PyTorch's: step up the gradient (negated first) */

struct SGDOptions {
#define MFS_OPTION_FIELD(type, name) type name{};
  MFS_SGD_OPTIONS(MFS_OPTION_FIELD)
#undef MFS_OPTION_FIELD
};

// The math's options from the user's: each float32 constant rounded once as
// stock rounds its Python scalars, each flag decided on the double values as
// stock's Python branches are. `grad_input`: a loss scale or a clip factor
// is read on the device.
inline SGDHyper hyper_of(const SGDOptions& o, bool grad_input) {
  const bool momentum = o.momentum > 0;
  SGDHyper h;
  h.weight_decay = static_cast<float>(o.weight_decay);
  h.momentum = static_cast<float>(o.momentum);
  // Stock computes (1 - dampening) on Python floats, then rounds once.
  h.dampening_scale = static_cast<float>(1.0 - o.dampening);
  h.has_weight_decay = o.weight_decay != 0;
  h.has_dampening = momentum && o.dampening > 0;
  h.nesterov = momentum && o.nesterov;
  h.scale_grad = grad_input || o.maximize;
  return h;
}
#endif

struct ParamVelocity {
  float param;
  float velocity;
};

// One element of the SGD step, in float32 (half types are widened by the
// caller and rounded once on store). kMomentum (momentum > 0) is the one
// compile-time flag: it decides whether a momentum buffer is read and
// written at all.
template <bool kMomentum>
MFS_INLINE ParamVelocity sgd_update_element(
    float p,
    float g,
    float v,
    StepScalars s,
    MFS_CONSTANT const SGDHyper& h) {
  if (h.scale_grad) {
    g = g / s.grad_divisor;
    g = g * s.clip_factor;
  }
  if (h.has_weight_decay) {
    float decay = h.weight_decay * p;
    g = g + decay;
  }
  if (!kMomentum) {
    float step = s.lr * g;
    ParamVelocity out = {p - step, v};
    return out;
  }
  v = h.momentum * v;
  if (h.has_dampening) {
    float scaled = h.dampening_scale * g;
    v = v + scaled;
  } else {
    v = v + g;
  }
  float update = v;
  if (h.nesterov) {
    float lookahead = h.momentum * v;
    update = g + lookahead;
  }
  float step = s.lr * update;
  ParamVelocity out = {p - step, v};
  return out;
}

// How an updated param is stored (the kernels' last template argument):
//   kRoundNearest:    rounded to the param's dtype, as stock does.
//   kRoundStochastic: bfloat16 params, rounded up or down at random with the
//                     probabilities that make the rounding unbiased.
//   kMasterWeights:   a float32 master copy is read and written in place of
//                     the param; the param is written as its rounded copy.
MFS_CONSTANT_INT kRoundNearest = 0;
MFS_CONSTANT_INT kRoundStochastic = 1;
MFS_CONSTANT_INT kMasterWeights = 2;

// The value a master-weights update starts from: the float32 master copy
// where the param is still its rounding (what the last update stored), the
// param itself where it is not. A param changed outside the optimizer
// (reloaded, reset, stepped by stock SGD, which ignores the copy) is never
// overwritten by a stale copy. `rounded` is the master rounded to the
// param's dtype as the update stores it, widened back (exact).
MFS_INLINE float master_or_param(float master, float rounded, float param) {
  return rounded == param ? master : param;
}

// A 32-bit integer hash with good avalanche (Wellons' lowbias32): a
// bijection, so distinct inputs of one stream never share their bits.
MFS_INLINE uint32_t hash32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// The random stream of one tensor at one step, from the user's seed: a
// different stream for every (seed, step, tensor), so the rounding is
// deterministic given the seed and the step and independent across steps.
MFS_INLINE uint64_t
rounding_stream(uint64_t seed, uint64_t step, uint64_t tensor) {
  uint32_t a = hash32(uint32_t(seed) ^ hash32(uint32_t(seed >> 32)));
  uint32_t b = hash32(a ^ uint32_t(step));
  b = hash32(b ^ uint32_t(step >> 32));
  uint32_t c = hash32(b ^ uint32_t(tensor) ^ 0x9e3779b9u);
  uint32_t d = hash32(c ^ uint32_t(tensor >> 32));
  return (uint64_t(c) << 32) | uint64_t(d);
}

// 16 random bits for element `index` of a stream: one hash of the element's
// index keyed by the stream (a bijection of the index for a fixed stream, so
// no two elements below 2^32 share their input; the index's high word, zero
// for smaller tensors, is folded in too). One hash, not two: the bits are
// computed for every element of every step.
MFS_INLINE uint32_t rounding_bits(uint64_t stream, uint64_t index) {
  uint32_t x = (uint32_t(index) ^ uint32_t(stream)) + uint32_t(stream >> 32) +
               uint32_t(index >> 32) * 0x9e3779b9u;
  return hash32(x) >> 16;
}

// x rounded to bfloat16 stochastically, returned as the float32 it is (its
// low 16 bits cleared, so the caller's conversion to bfloat16 is exact).
// Adding 16 uniform bits below bfloat16's last bit carries into it with
// probability (x - down) / ulp: E[result] = x exactly, for either sign
// (float32 is sign-magnitude). NaN and Inf are returned as they are.
MFS_INLINE float round_bf16_stochastic(float x, uint32_t random16) {
  if (is_nonfinite(x)) {
    return x;
  }
  uint32_t bits = MFS_FLOAT_BITS(x);
  bits = (bits + random16) & 0xffff0000u;
  return MFS_BITS_FLOAT(bits);
}

} // namespace math
} // namespace mlx_fused_sgd
