// Half-precision types of the Linux models of the GPU backends
// (tests/metal_shim, tests/cuda_shim): float16 is the compiler's _Float16,
// bfloat16 a 16-bit struct rounding to nearest even from float, as Metal's
// bfloat and CUDA's __nv_bfloat16 do.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace mfs_gpu_types {

struct BFloat16 {
  uint16_t bits;
  BFloat16() = default;
  explicit BFloat16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    if (std::isnan(f)) {
      bits = static_cast<uint16_t>((u >> 16) | 0x40);
    } else {
      u += 0x7FFF + ((u >> 16) & 1);
      bits = static_cast<uint16_t>(u >> 16);
    }
  }
  explicit operator float() const {
    uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
  }
};

} // namespace mfs_gpu_types
