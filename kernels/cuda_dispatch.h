// Which CUDA kernel instantiation an update runs: the run-time dtypes and
// variant (launch::SGDVariant) mapped onto the kernels' template arguments,
// for exactly the set the Metal kernels instantiate by name (the param dtype
// with momentum buffers of the same dtype or float32; stochastic rounding
// for bfloat16 params, master weights for half params; Nesterov never with
// dampening, which validation refuses). Shared by eval_gpu and the host
// harness, which pass their own half types.
#pragma once

#include <type_traits>
#include <utility>

#include "kernels/sgd_launch.h"

namespace mlx_fused_sgd {
namespace cuda_launch {

enum class Dtype { float32, float16, bfloat16 };

template <bool kValue> using Bool = std::integral_constant<bool, kValue>;

template <typename Fn> void dispatch_bool(bool value, Fn&& fn) {
  if (value) {
    fn(Bool<true>{});
  } else {
    fn(Bool<false>{});
  }
}

template <typename Half, typename BFloat, typename Fn>
bool dispatch_dtype(Dtype dtype, Fn&& fn) {
  switch (dtype) {
  case Dtype::float32:
    fn(static_cast<float*>(nullptr));
    return true;
  case Dtype::float16:
    fn(static_cast<Half*>(nullptr));
    return true;
  case Dtype::bfloat16:
    fn(static_cast<BFloat*>(nullptr));
    return true;
  }
  return false;
}

// Calls fn.template operator()<T, V, WD, M, D, N, S, R>() for the kernel of
// params of `dtype` with momentum buffers of `state_dtype` (ignored without
// momentum) and variant `v`; false when no kernel is instantiated for them.
template <typename Half, typename BFloat, typename Fn>
bool dispatch_sgd(
    Dtype dtype, Dtype state_dtype, const launch::SGDVariant& v, Fn&& fn) {
  const bool half_param = dtype != Dtype::float32;
  if (!v.momentum) {
    state_dtype = dtype;
  }
  if (state_dtype != dtype && state_dtype != Dtype::float32) {
    return false;
  }
  if (v.rounding == math::kRoundStochastic && dtype != Dtype::bfloat16) {
    return false;
  }
  if (v.rounding == math::kMasterWeights && !half_param) {
    return false;
  }
  if (v.nesterov && v.dampening) {
    return false;
  }
  bool found = false;
  auto with_rounding =
      [&](auto t, auto s_dtype, auto wd, auto m, auto d, auto n, auto s) {
        using T = std::remove_pointer_t<decltype(t)>;
        using V = std::remove_pointer_t<decltype(s_dtype)>;
        auto call = [&]<int R>() {
          // Dampening and Nesterov exist only with momentum, and never
          // together: such flags map onto the kernel that runs them.
          fn.template
          operator()<T, V, wd(), m(), m() && d(), m() && n() && !d(), s(), R>();
          found = true;
        };
        switch (v.rounding) {
        case math::kRoundNearest:
          call.template operator()<math::kRoundNearest>();
          break;
        case math::kRoundStochastic:
          if constexpr (std::is_same_v<T, BFloat>) {
            call.template operator()<math::kRoundStochastic>();
          }
          break;
        case math::kMasterWeights:
          if constexpr (!std::is_same_v<T, float>) {
            call.template operator()<math::kMasterWeights>();
          }
          break;
        }
      };
  dispatch_dtype<Half, BFloat>(dtype, [&](auto t) {
    dispatch_dtype<Half, BFloat>(state_dtype, [&](auto s_dtype) {
      using T = std::remove_pointer_t<decltype(t)>;
      using V = std::remove_pointer_t<decltype(s_dtype)>;
      if constexpr (std::is_same_v<T, V> || std::is_same_v<V, float>) {
        dispatch_bool(v.weight_decay, [&](auto wd) {
          dispatch_bool(v.momentum, [&](auto m) {
            dispatch_bool(v.dampening, [&](auto d) {
              dispatch_bool(v.nesterov, [&](auto n) {
                dispatch_bool(v.scale_grad, [&](auto s) {
                  with_rounding(t, s_dtype, wd, m, d, n, s);
                });
              });
            });
          });
        });
      }
    });
  });
  return found;
}

} // namespace cuda_launch
} // namespace mlx_fused_sgd
