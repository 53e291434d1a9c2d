// Which CUDA kernel instantiation an update runs: the run-time dtypes, the
// momentum buffer and the storage mode mapped onto the kernels' template
// arguments, for exactly the set the Metal kernels instantiate by name (the
// param dtype with momentum buffers of the same dtype or float32, or none;
// stochastic rounding for bfloat16 params, master weights for half params;
// Nesterov never with dampening, which validation refuses). Shared by
// eval_gpu and the host harness, which pass their own half types.
#pragma once

#include <type_traits>
#include <utility>

#include "kernels/sgd_plan.h"

namespace mlx_fused_sgd {
namespace cuda_launch {

template <bool kValue> using Bool = std::integral_constant<bool, kValue>;

template <typename Fn> void dispatch_bool(bool value, Fn&& fn) {
  if (value) {
    fn(Bool<true>{});
  } else {
    fn(Bool<false>{});
  }
}

template <typename Half, typename BFloat, typename Fn>
bool dispatch_dtype(launch::ElementType dtype, Fn&& fn) {
  switch (dtype) {
  case launch::ElementType::float32:
    fn(static_cast<float*>(nullptr));
    return true;
  case launch::ElementType::float16:
    fn(static_cast<Half*>(nullptr));
    return true;
  case launch::ElementType::bfloat16:
    fn(static_cast<BFloat*>(nullptr));
    return true;
  }
  return false;
}

// Calls fn.template operator()<T, V, M, R>() for the kernel of params of
// `dtype` with momentum buffers of `state_dtype` (ignored without momentum)
// and variant `v`; false when no kernel is instantiated for them. The other
// options are SGDArgs' run-time flags.
template <typename Half, typename BFloat, typename Fn>
bool dispatch_sgd(
    launch::ElementType dtype,
    launch::ElementType state_dtype,
    const launch::SGDVariant& v,
    Fn&& fn) {
  if (!v.momentum) {
    state_dtype = dtype;
  }
  if (v.nesterov() && v.dampening()) {
    return false;
  }
  bool found = false;
  dispatch_dtype<Half, BFloat>(dtype, [&](auto t) {
    dispatch_dtype<Half, BFloat>(state_dtype, [&](auto s_dtype) {
      using T = std::remove_pointer_t<decltype(t)>;
      using V = std::remove_pointer_t<decltype(s_dtype)>;
      constexpr bool same = std::is_same_v<T, V>;
      constexpr bool half = !std::is_same_v<T, float>;
      dispatch_bool(v.momentum, [&](auto m) {
        // Without momentum there is no buffer: one kernel, V = T.
        if constexpr (same || (m() && std::is_same_v<V, float>)) {
          auto call = [&]<int R>() {
            fn.template operator()<T, V, m(), R>();
            found = true;
          };
          if (v.rounding == math::kRoundNearest) {
            call.template operator()<math::kRoundNearest>();
          } else if (v.rounding == math::kRoundStochastic) {
            if constexpr (std::is_same_v<T, BFloat>) {
              call.template operator()<math::kRoundStochastic>();
            }
          } else if (v.rounding == math::kMasterWeights) {
            if constexpr (half) {
              call.template operator()<math::kMasterWeights>();
            }
          }
        }
      });
    });
  });
  return found;
}

} // namespace cuda_launch
} // namespace mlx_fused_sgd
