// Per-element math of mlx-fused-sgd: the step-decay learning rate and the SGD
// update. This header is the one source of truth for both backends: the CPU
// loops in csrc/ and the Metal kernels in kernels/*.metal include it.
//
// Parity contract (see DESIGN.md): every line rounds to float32 exactly as
// stock mlx.optimizers.SGD rounds it. Each multiply and each add is its own
// statement so that no compiler may contract them into an FMA (contraction
// only happens inside one expression unless fast-math is on); the CPU build
// also passes -ffp-contract=off and Metal is built with -fno-fast-math.
#pragma once

#ifdef __METAL_VERSION__
#include <metal_stdlib>
#define MFS_INLINE inline
#define MFS_POW metal::pow
#else
#include <cmath>
#include <cstdint>
// Always inlined: the CPU loops are compiled once per instruction set, and an
// out-of-line copy shared between them could be one the CPU cannot run.
#define MFS_INLINE inline __attribute__((always_inline))
#define MFS_POW std::pow
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

// Hyperparameters of one update, each already rounded once to float32 the way
// stock rounds its Python scalars: float32(weight_decay), float32(momentum),
// float32(1 - dampening) with the subtraction done in double precision.
struct SGDHyper {
  float weight_decay;
  float momentum;
  float dampening_scale;
  // The gradient is divided by this first (kScaleGrad only): the loss scale,
  // negated for maximize (g / -s == -(g / s) exactly).
  float grad_divisor;
  // ... then multiplied by this (kScaleGrad only): the global-norm clip
  // factor, 1 without clipping (g * 1 == g exactly).
  float grad_multiplier;
};

struct ParamVelocity {
  float param;
  float velocity;
};

// One element of the SGD step, in float32 (half types are widened by the
// caller and rounded once on store). The template flags select the variant at
// compile time, mirroring stock's Python branches:
//   kWeightDecay: weight_decay != 0      kMomentum: momentum > 0
//   kDampening:   dampening > 0          kNesterov: nesterov
//   kScaleGrad:   grad_scale, maximize or clipping (PyTorch's order: the
//                 gradient is unscaled, clipped and negated before weight
//                 decay)
template <
    bool kWeightDecay,
    bool kMomentum,
    bool kDampening,
    bool kNesterov,
    bool kScaleGrad>
MFS_INLINE ParamVelocity
sgd_update_element(float p, float g, float v, float lr, SGDHyper h) {
  if (kScaleGrad) {
    g = g / h.grad_divisor;
    g = g * h.grad_multiplier;
  }
  if (kWeightDecay) {
    float decay = h.weight_decay * p;
    g = g + decay;
  }
  if (!kMomentum) {
    float step = lr * g;
    ParamVelocity out = {p - step, v};
    return out;
  }
  v = h.momentum * v;
  if (kDampening) {
    float scaled = h.dampening_scale * g;
    v = v + scaled;
  } else {
    v = v + g;
  }
  float update = v;
  if (kNesterov) {
    float lookahead = h.momentum * v;
    update = g + lookahead;
  }
  float step = lr * update;
  ParamVelocity out = {p - step, v};
  return out;
}

} // namespace math
} // namespace mlx_fused_sgd
