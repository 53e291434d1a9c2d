// Small helpers shared by the primitives of mlx-fused-sgd.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "mlx/array.h"
#include "mlx/dtype.h"

#include "kernels/sgd_plan.h"

namespace mlx_fused_sgd {

namespace mx = mlx::core;

// Offset (in elements) of the elem-th element, in row-major order, of an array
// with the given shape and strides. 64-bit throughout so arrays of more than
// 2^31 elements index correctly.
inline int64_t
elem_to_loc(int64_t elem, const mx::Shape& shape, const mx::Strides& strides) {
  int64_t loc = 0;
  for (int i = static_cast<int>(shape.size()) - 1; i >= 0 && elem > 0; --i) {
    loc += (elem % shape[i]) * strides[i];
    elem /= shape[i];
  }
  return loc;
}

// Row-major strides of `shape`, as MLX gives a freshly allocated array.
inline mx::Strides row_major_strides(const mx::Shape& shape) {
  mx::Strides strides(shape.size(), 1);
  for (int i = static_cast<int>(shape.size()) - 2; i >= 0; --i) {
    strides[i] = strides[i + 1] * shape[i + 1];
  }
  return strides;
}

// The flags MLX gives a freshly allocated row-major array (array::set_data).
inline mx::array::Flags fresh_flags(const mx::array& a) {
  mx::array::Flags flags;
  flags.contiguous = true;
  flags.row_contiguous = true;
  int64_t max_dim = 0;
  for (auto d : a.shape()) {
    max_dim = std::max<int64_t>(max_dim, d);
  }
  flags.col_contiguous =
      a.size() <= 1 || static_cast<int64_t>(a.size()) == max_dim;
  return flags;
}

// Gives `out` a new buffer from MLX's allocator. MLX returns a null buffer
// instead of raising when an allocation fails (a broadcast param of huge
// logical size, say), and a kernel would then write through it: raise a
// clear error instead (mx.eval reports it as a RuntimeError).
void allocate(mx::array& out);

// MLX gives every output of a multi-output primitive its own copy of the input
// list, so each input is referenced once per output and is_donatable() (use
// count == 1) can never hold. The eval loop clears those sibling copies with
// array::detach() right after this eval; clearing them just before lets the
// inputs that nothing else references be donated to the outputs. Tracers
// (inside mx.compile or a transform) keep their graph untouched.
inline void release_sibling_inputs(
    const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  for (auto& out : outputs) {
    if (out.is_tracer()) {
      return;
    }
  }
  for (auto& out : outputs) {
    if (&out.inputs() != &inputs) {
      out.inputs().clear();
    }
  }
}

// The .metallib built from kernels/*.metal, installed next to the extension.
// MLX caches libraries by name, so the name is this package's own.
inline constexpr const char* kMetalLibraryName = "mlx_fused_sgd";

// Whether this build has the Metal kernels: MLX with a Metal backend
// (_METAL_) and this package's metallib compiled (MFS_HAVE_METALLIB, set by
// CMake when the Metal compiler was found). Without them, ops on a GPU
// stream are composed of stock MLX ops instead.
#if defined(_METAL_) && defined(MFS_HAVE_METALLIB)
#define MFS_METAL_KERNELS 1
#else
#define MFS_METAL_KERNELS 0
#endif
inline constexpr bool kHaveMetalKernels = MFS_METAL_KERNELS;

// Whether this build has the CUDA kernels (csrc/cuda/, compiled by nvcc
// against MLX's CUDA backend; MFS_CUDA_KERNELS is set by CMake).
#if defined(MFS_CUDA_KERNELS)
inline constexpr bool kHaveCudaKernels = true;
#else
inline constexpr bool kHaveCudaKernels = false;
#endif

// What GPU streams run: this package's kernels (`fused`), or the composed
// fallback and why (`reason`).
struct GpuKernelStatus {
  bool fused = false;
  std::string library_path; // the metallib, when the build has one
  std::string reason;       // why not fused (empty when fused)
};

// The decision, factored so that a failed load can be simulated: `load`
// loads the metallib and throws on failure.
GpuKernelStatus decide_gpu_kernels(
    bool built_with_kernels,
    const std::string& library_path,
    const std::function<void()>& load,
    const std::string& no_kernels_reason);

// Decided once per process, on the first op on a GPU stream (or the first
// backend_info()): the metallib is loaded then, so that a library the OS
// refuses sends GPU streams to the fallback instead of failing inside
// mx.eval. A failed load is reported once through the notifier.
const GpuKernelStatus& gpu_kernel_status();
void set_gpu_fallback_notifier(std::function<void(const std::string&)> notify);

// True when an op on stream `s` runs this package's kernels; false when it
// must fall back to stock MLX ops (a GPU without kernels of ours).
inline bool has_fused_kernel(const mx::Stream& s) {
  return s.device == mx::Device::cpu || gpu_kernel_status().fused;
}

// Directory holding this extension's shared object, where the .metallib is
// installed next to it.
std::string extension_dir();

// The kernels' element type of a float dtype (validation admits no other:
// anything else is refused, naming it).
launch::ElementType element_type(mx::Dtype dtype);

std::string dtype_name(mx::Dtype dtype);

std::string shape_str(const mx::Shape& shape);

} // namespace mlx_fused_sgd
