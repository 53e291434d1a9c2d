#include "utils.h"

#include <dlfcn.h>

#include <filesystem>
#include <sstream>
#include <utility>

#include "mlx/allocator.h"
#include "mlx/utils.h"
#include <mutex>
#include <stdexcept>
#if MFS_METAL_KERNELS
#include "mlx/backend/metal/device.h"
#endif

namespace mlx_fused_sgd {

std::string extension_dir() {
  static const std::string dir = []() {
    Dl_info info;
    if (!dladdr(reinterpret_cast<void*>(&extension_dir), &info)) {
      throw std::runtime_error(
          "mlx_fused_sgd: cannot locate the extension's own directory.");
    }
    return std::filesystem::path(info.dli_fname).parent_path().string();
  }();
  return dir;
}

GpuKernelStatus decide_gpu_kernels(
    bool built_with_kernels,
    const std::string& library_path,
    const std::function<void()>& load,
    const std::string& no_kernels_reason) {
  GpuKernelStatus status;
  if (!built_with_kernels) {
    status.reason = no_kernels_reason;
    return status;
  }
  status.library_path = library_path;
  try {
    load();
    status.fused = true;
  } catch (const std::exception& e) {
    status.reason =
        std::string("the Metal kernels (") + library_path +
        ") did not load: " + e.what() +
        ". Reinstall mlx-fused-sgd on this Mac (its kernels are compiled "
        "for macOS 14 or later with Metal 3.1; a metallib copied from "
        "another machine or built for a newer macOS is refused).";
  }
  return status;
}

namespace {

std::mutex notifier_mutex;
std::function<void(const std::string&)> fallback_notifier;

std::string no_kernels_reason() {
#if defined(MFS_METAL_TOOLCHAIN_MISSING)
  return "this install was built without the Metal kernels: the Metal "
         "compiler was missing (xcrun -sdk macosx -f metal failed). Install "
         "Xcode and select it (sudo xcode-select -s /Applications/Xcode.app), "
         "download its Metal toolchain (xcodebuild -downloadComponent "
         "MetalToolchain), and reinstall mlx-fused-sgd.";
#elif defined(_METAL_)
  return "this install was built without the Metal kernels.";
#else
  return "this install has no GPU kernels (MLX without Metal, and "
         "mlx-fused-sgd built without CUDA): GPU streams use the composed "
         "fallback. With MLX's CUDA backend, build mlx-fused-sgd against it "
         "with nvcc (see the README's section on NVIDIA GPUs).";
#endif
}

} // namespace

void set_gpu_fallback_notifier(std::function<void(const std::string&)> notify) {
  std::lock_guard<std::mutex> lock(notifier_mutex);
  fallback_notifier = std::move(notify);
}

const GpuKernelStatus& gpu_kernel_status() {
  static const GpuKernelStatus status = [] {
    if (kHaveCudaKernels) {
      // Compiled into the extension: nothing to load.
      GpuKernelStatus cuda;
      cuda.fused = true;
      return cuda;
    }
    const auto path = extension_dir() + "/" + kMetalLibraryName + ".metallib";
    auto load = [] {
#if MFS_METAL_KERNELS
      auto& d = mx::metal::device(mx::Device::gpu);
      d.get_library(kMetalLibraryName, extension_dir());
#endif
    };
    auto decided =
        decide_gpu_kernels(kHaveMetalKernels, path, load, no_kernels_reason());
    if (kHaveMetalKernels && !decided.fused) {
      std::lock_guard<std::mutex> lock(notifier_mutex);
      if (fallback_notifier) {
        fallback_notifier(
            "mlx_fused_sgd: " + decided.reason +
            " GPU streams use the composed fallback (stock MLX ops, the same "
            "numbers, slower) until then.");
      }
    }
    return decided;
  }();
  return status;
}

void allocate(mx::array& out) {
  auto data = mx::allocator::malloc(out.nbytes());
  if (data.buffer().ptr() == nullptr && out.nbytes() > 0) {
    throw std::runtime_error(
        "mlx_fused_sgd: could not allocate " + std::to_string(out.nbytes()) +
        " bytes for an output of shape " + shape_str(out.shape()) + " (" +
        dtype_name(out.dtype()) +
        "); the update writes a full array for every param (a broadcast "
        "param is materialized).");
  }
  out.set_data(std::move(data));
}

launch::ElementType element_type(mx::Dtype dtype) {
  if (dtype == mx::float32) {
    return launch::ElementType::float32;
  }
  if (dtype == mx::float16) {
    return launch::ElementType::float16;
  }
  if (dtype == mx::bfloat16) {
    return launch::ElementType::bfloat16;
  }
  throw std::invalid_argument(
      "mlx_fused_sgd: the kernels take float32, float16 and bfloat16, not " +
      dtype_name(dtype) + ".");
}

std::string dtype_name(mx::Dtype dtype) {
  std::ostringstream os;
  os << dtype;
  return os.str();
}

std::string shape_str(const mx::Shape& shape) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    os << shape[i] << (shape.size() == 1 ? "," : "")
       << (i + 1 < shape.size() ? ", " : "");
  }
  os << ")";
  return os.str();
}

} // namespace mlx_fused_sgd
