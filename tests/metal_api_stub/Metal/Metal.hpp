// Declarations-only stand-in for metal-cpp (<Metal/Metal.hpp>), so that the
// real MLX Metal headers and our eval_gpu code (-D_METAL_) can be
// syntax-checked on Linux (tests/test_metal_harness.py). Nothing here runs.
#pragma once

#include <cstddef>
#include <cstdint>

namespace NS {
using UInteger = unsigned long;
class AutoreleasePool;
class String;
class Error;
template <typename T>
class SharedPtr {
 public:
  T* get() const;
  T* operator->() const;
  explicit operator bool() const;
};
template <typename T>
SharedPtr<T> TransferPtr(T*);
template <typename T>
SharedPtr<T> RetainPtr(T*);
} // namespace NS

namespace MTL {
enum class DataType : unsigned long { Bool, Int, Float };
struct Size {
  Size(NS::UInteger w, NS::UInteger h, NS::UInteger d);
  NS::UInteger width, height, depth;
};
class Allocation;
class Buffer;
class CommandBuffer;
class CommandQueue;
class Device;
class Fence;
class Function;
class Library;
class LinkedFunctions;
class Resource;
class ResidencySet;
class ResidencySets;
class ComputePipelineState {
 public:
  NS::UInteger maxTotalThreadsPerThreadgroup() const;
  NS::UInteger threadExecutionWidth() const;
};
class ComputeCommandEncoder {
 public:
  void setComputePipelineState(const ComputePipelineState*);
  void setBytes(const void*, NS::UInteger length, NS::UInteger index);
  void setThreadgroupMemoryLength(NS::UInteger length, NS::UInteger index);
};
} // namespace MTL
