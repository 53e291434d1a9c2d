// What the CUDA eval_gpu of every primitive shares: the kernels' dtype codes
// and the grid of a launch.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "kernels/cuda_dispatch.h"
#include "mlx/dtype.h"
#include "utils.h"

namespace mlx_fused_sgd {
namespace cuda {

// The kernels' code for a float dtype (validation admits no other).
inline cuda_launch::Dtype dtype_of(mx::Dtype dtype) {
  if (dtype == mx::float16) {
    return cuda_launch::Dtype::float16;
  }
  if (dtype == mx::bfloat16) {
    return cuda_launch::Dtype::bfloat16;
  }
  if (dtype == mx::float32) {
    return cuda_launch::Dtype::float32;
  }
  throw std::invalid_argument(
      "mlx_fused_sgd: the CUDA kernels take float32, float16 and bfloat16, "
      "not " +
      dtype_name(dtype) + ".");
}

// A 1-D grid of `blocks` blocks (a grid's x extent is below 2^31).
inline dim3 grid(int64_t blocks) {
  if (blocks >= (int64_t(1) << 31)) {
    throw std::runtime_error(
        "mlx_fused_sgd: a launch of " + std::to_string(blocks) +
        " blocks is past CUDA's grid limit.");
  }
  return dim3(static_cast<unsigned>(blocks));
}

} // namespace cuda
} // namespace mlx_fused_sgd
