// The CPU loops of the fused SGD update. csrc/sgd_cpu_kernel.cpp is compiled
// once per instruction set (generic, and AVX2 and AVX-512 on x86-64); the
// best one this CPU runs is chosen once, at first use.
#pragma once

#include <cstdint>

#include "mlx/array.h"

#include "kernels/sgd_math.h"

namespace mlx_fused_sgd {
namespace cpu_kernel {

namespace mx = mlx::core;

// One tensor of a chunk, as the loops see it.
struct TensorPointers {
  const void* param;
  const void* grad;
  const void* velocity;
  void* param_out;
  void* velocity_out;
  int64_t size;
  // Strided inputs (rare: transposed or broadcast) take the general loop.
  bool contiguous;
  mx::Shape shape;
  mx::Strides param_strides;
  mx::Strides grad_strides;
  mx::Strides velocity_strides;
  // Master weights: the float32 copy read in place of the param, and where
  // its update goes (row-contiguous or strided like the others).
  const float* master = nullptr;
  float* master_out = nullptr;
  mx::Strides master_strides;
  // Stochastic rounding: this tensor's index in the update, and its random
  // stream (math::rounding_stream), set when the step counter is read.
  uint64_t rounding_tensor = 0;
  uint64_t rounding_stream = 0;
};

enum class DtypeCode : uint8_t { float32, float16, bfloat16 };

inline DtypeCode dtype_code(mx::Dtype dtype) {
  if (dtype == mx::float16) {
    return DtypeCode::float16;
  }
  if (dtype == mx::bfloat16) {
    return DtypeCode::bfloat16;
  }
  return DtypeCode::float32;
}

// The dtype and compile-time variant of a chunk.
struct KernelKey {
  DtypeCode dtype;
  DtypeCode state_dtype; // the momentum buffer's: the param's, or float32
  bool weight_decay;
  bool momentum;
  bool dampening;
  bool nesterov;
  bool scale_grad;
  int rounding; // math::kRoundNearest, kRoundStochastic or kMasterWeights
};

// Updates elements [begin, end) of one tensor.
using UpdateRangeFn = void(
    const KernelKey& key,
    const TensorPointers& t,
    int64_t begin,
    int64_t end,
    float lr,
    math::SGDHyper h);
using UpdateRange = UpdateRangeFn*;

// The gradient reads before an update, over contiguous elements [begin,
// end) of one tensor: the sum of squares (max_grad_norm) in 16 independent
// double lanes, so every instruction set adds in the same order; and whether
// any element is NaN or Inf (skip_nonfinite).
using SqSumRangeFn =
    double(DtypeCode dtype, const void* data, int64_t begin, int64_t end);
using NonfiniteRangeFn =
    bool(DtypeCode dtype, const void* data, int64_t begin, int64_t end);

// The loops of one instruction set.
struct Loops {
  UpdateRangeFn* update;
  SqSumRangeFn* sq_sum;
  NonfiniteRangeFn* nonfinite;
  const char* isa;
};

// One set per instruction set. The wider ones take contiguous tensors;
// strided ones go to the generic loops.
extern const Loops loops_generic;
UpdateRangeFn update_range_generic;
#if defined(__x86_64__) || defined(_M_X64)
#define MFS_X86_KERNELS 1
extern const Loops loops_avx2;
extern const Loops loops_avx512;
#endif

// A skipped step (skip_nonfinite): copies elements [begin, end) of the param,
// momentum buffer and master copy to the outputs, a no-op where they share the
// buffer.
void copy_range(
    const KernelKey& key, const TensorPointers& t, int64_t begin, int64_t end);

// The loops for this CPU: the widest instruction set it (and its OS)
// supports, unless MLX_FUSED_SGD_CPU_ISA=generic|avx2|avx512 asks for another.
const Loops& selected_loops();

UpdateRange select_update_range();

// The name of the instruction set selected_loops() picks.
const char* selected_isa();

} // namespace cpu_kernel
} // namespace mlx_fused_sgd
