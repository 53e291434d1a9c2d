#include "utils.h"

#include <dlfcn.h>

#include <filesystem>
#include <sstream>
#include <utility>

#include "mlx/allocator.h"
#include "mlx/utils.h"
#include <stdexcept>

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
