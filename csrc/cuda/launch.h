// What the CUDA eval_gpu of every primitive shares: the kernels' dtype codes,
// the grid of a launch, the arrays it reads and writes, and the launch itself.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "kernels/cuda_dispatch.h"
#include "mlx/backend/cuda/device.h"
#include "mlx/dtype.h"
#include "utils.h"

namespace mlx_fused_sgd {
namespace cuda {

// A 1-D grid of `blocks` blocks (a grid's x extent is below 2^31).
inline dim3 grid(int64_t blocks) {
  if (blocks >= (int64_t(1) << 31)) {
    throw std::runtime_error(
        "mlx_fused_sgd: a launch of " + std::to_string(blocks) +
        " blocks is past CUDA's grid limit.");
  }
  return dim3(static_cast<unsigned>(blocks));
}

// A kernel parameter's type as an argument may have it: a pointer to const
// data is passed the same as a pointer to mutable data.
template <typename X> struct launch_arg {
  using type = X;
};
template <typename X> struct launch_arg<const X*> {
  using type = X*;
};
template <typename X>
using launch_arg_t = typename launch_arg<std::decay_t<X>>::type;

// The arrays one launch reads and writes. MLX's CUDA encoder records a
// launch as a node of a CUDA graph whose edges come from the arrays declared
// (set_input_array, set_output_array) since its previous node, and forgets
// them once the node is added. So each launch declares its own arrays, right
// before it is added: a launch that did not would have no edge to the
// kernels that produce its inputs, and readers of its outputs no edge to it.
class LaunchArrays {
 public:
  LaunchArrays& reads(const mx::array& a) {
    reads_.push_back(&a);
    return *this;
  }
  LaunchArrays& writes(const mx::array& a) {
    writes_.push_back(&a);
    return *this;
  }
  void declare(mx::cu::CommandEncoder& encoder) const {
    if (writes_.empty()) {
      throw std::logic_error(
          "mlx_fused_sgd: a CUDA launch that writes no array.");
    }
    for (const auto* a : reads_) {
      encoder.set_input_array(*a);
    }
    for (const auto* a : writes_) {
      encoder.set_output_array(*a);
    }
  }

 private:
  std::vector<const mx::array*> reads_;
  std::vector<const mx::array*> writes_;
};

// Adds a launch of `kernel` to MLX's command encoder, after declaring the
// arrays it reads and writes. MLX's library links the CUDA runtime
// statically, and a runtime launches only the kernels registered with itself;
// ours are registered with this extension's own runtime. So MLX is handed the
// kernel's driver handle (CUfunction), which it launches, or adds to its
// graph, through the driver API, like its own JIT kernels.
template <typename... KernelArgs, typename... Args>
void add_kernel(
    mx::cu::CommandEncoder& encoder,
    const LaunchArrays& arrays,
    void (*kernel)(KernelArgs...),
    dim3 grid,
    dim3 block,
    Args&&... args) {
  // The kernel reads each argument through a pointer to it, as the type of
  // its parameter: the types must be the same, not merely convertible.
  static_assert(
      (std::is_same_v<launch_arg_t<KernelArgs>, launch_arg_t<Args>> && ...),
      "each argument must have its kernel parameter's type");
  // The multi-tensor tables travel as kernel parameters: kept within the
  // classic 4 KB limit (padding aside), as CUDA 12.1 raised it only for
  // some launches.
  static_assert(
      (sizeof(KernelArgs) + ... + 0) <= 4096,
      "a kernel's parameters must fit in 4 KB");
  cudaFunction_t function = nullptr;
  const cudaError_t status =
      cudaGetFuncBySymbol(&function, reinterpret_cast<const void*>(kernel));
  if (status != cudaSuccess) {
    throw std::runtime_error(
        std::string("mlx_fused_sgd: no CUDA kernel to launch (") +
        cudaGetErrorString(status) + ").");
  }
  arrays.declare(encoder);
  encoder.add_kernel_node_ex(
      static_cast<CUfunction>(function),
      grid,
      block,
      {}, // no thread block cluster, as MLX's own add_kernel_node
      0,
      std::forward<Args>(args)...);
}

} // namespace cuda
} // namespace mlx_fused_sgd
