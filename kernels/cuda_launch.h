// How the CUDA kernels are launched: the multi-tensor tables (as Apex's
// multi-tensor apply: one launch updates many tensors, each block one chunk
// of one tensor; the plan itself is kernels/sgd_plan.h's, shared by every
// backend), the strided layout passed by value, and CUDA's launch sizes.
// Shared by eval_gpu (csrc/cuda/) and the host harness
// (tests/cuda_harness.cpp), so the harness cannot drift from what eval_gpu
// launches.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "kernels/sgd_plan.h"

namespace mlx_fused_sgd {
namespace cuda_launch {

// Threads per block of every kernel (whole warps).
inline constexpr int kThreads = 256;
inline constexpr int kWarpSize = 32;
// Elements of one operand a thread loads at once on the vector path
// (16 bytes of float32, 8 of half), and vector loads per thread per chunk.
inline constexpr int kVector = 4;
inline constexpr int kVectorsPerThread = 4;
// Elements one block of a multi-tensor launch updates: one chunk.
inline constexpr int64_t kChunk =
    int64_t(kThreads) * kVector * kVectorsPerThread;
// Tensors per multi-tensor launch: the table is passed by value, and kernel
// parameters are limited to 4 KB (the SGD table is 2.6 KB at 32).
inline constexpr int kMaxTensors = 32;
// Axes of a strided layout, as MLX's own CUDA kernels allow (after
// plan_strided has dropped size-1 axes and merged the rest, few layouts have
// more than 3).
inline constexpr int kMaxDims = 10;

// The tensors of one multi-tensor SGD launch; absent operands are null.
// Tensor t owns blocks [block_end[t - 1], block_end[t]) (block_end[-1] = 0).
struct SGDTable {
  const void* param[kMaxTensors];
  const void* grad[kMaxTensors];
  const void* velocity[kMaxTensors];
  void* param_out[kMaxTensors];
  void* velocity_out[kMaxTensors];
  const float* master[kMaxTensors];
  float* master_out[kMaxTensors];
  int64_t size[kMaxTensors];
  int64_t block_end[kMaxTensors];
  uint64_t tensor_id[kMaxTensors]; // its place in the update (rounding)
  uint32_t vector_ok; // bit t: every operand of tensor t is 16-byte aligned
  int32_t count;
};

// The gradients of one multi-tensor read (non-finite check, squared norm).
struct ReadTable {
  const void* data[kMaxTensors];
  int64_t size[kMaxTensors];
  int64_t block_end[kMaxTensors];
  int32_t count;
};

// The device scalars every SGD launch reads (absent ones point at a valid
// scalar the kernel ignores, as on Metal).
struct SGDScalars {
  const float* lr;
  const uint64_t* step;
  const float* grad_scale;
  const uint32_t* skip;
  const float* clip_factor;
  const uint64_t* rounding_step;
};

// A StridedLayout (launch::plan_strided) by value.
struct StridedArgs {
  int64_t shape[kMaxDims];
  int64_t strides[launch::kLayoutOperands][kMaxDims];
  int32_t ndim;
};

// A general gradient read's shape and strides (MLX's, not merged).
struct ReadShape {
  int64_t shape[kMaxDims];
  int64_t strides[kMaxDims];
  int32_t ndim;
};

// Blocks of a tensor of `size` elements in a multi-tensor launch.
MFS_INLINE int64_t chunks(int64_t size) {
  return (size + kChunk - 1) / kChunk;
}

// Host code (eval_gpu and the harness) from here on.

// The launches of a list of tensors (the shared multi-tensor plan, at
// CUDA's capacity): consecutive runs of at most kMaxTensors tensors in
// blocks of kChunk elements.
inline std::vector<launch::TensorSpan>
split_tables(const std::vector<int64_t>& sizes) {
  return launch::split_spans(sizes, kMaxTensors, kChunk);
}

// One tensor's operands for a multi-tensor SGD launch (absent: null), with
// the element sizes of its param and momentum buffer dtypes.
struct SGDOperands {
  const void* param;
  const void* grad;
  const void* velocity;
  void* param_out;
  void* velocity_out;
  const float* master;
  float* master_out;
  int64_t size;
  uint64_t tensor_id;
};

inline bool aligned_for_vectors(const void* p, size_t item) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % (item * kVector) == 0;
}

// The table of span `span` of `tensors` (split_tables).
inline SGDTable make_sgd_table(
    const launch::TensorSpan& span,
    const std::vector<SGDOperands>& tensors,
    size_t param_item,
    size_t state_item) {
  SGDTable table{};
  table.count = span.count;
  for (int k = 0; k < span.count; ++k) {
    const SGDOperands& t = tensors[span.first + k];
    table.param[k] = t.param;
    table.grad[k] = t.grad;
    table.velocity[k] = t.velocity;
    table.param_out[k] = t.param_out;
    table.velocity_out[k] = t.velocity_out;
    table.master[k] = t.master;
    table.master_out[k] = t.master_out;
    table.size[k] = t.size;
    table.block_end[k] = span.block_end[k];
    table.tensor_id[k] = t.tensor_id;
    const bool aligned = aligned_for_vectors(t.param, param_item) &&
                         aligned_for_vectors(t.grad, param_item) &&
                         aligned_for_vectors(t.param_out, param_item) &&
                         aligned_for_vectors(t.velocity, state_item) &&
                         aligned_for_vectors(t.velocity_out, state_item) &&
                         aligned_for_vectors(t.master, sizeof(float)) &&
                         aligned_for_vectors(t.master_out, sizeof(float));
    table.vector_ok |= aligned ? (1u << k) : 0u;
  }
  return table;
}

// The table of span `span` of gradients.
inline ReadTable make_read_table(
    const launch::TensorSpan& span,
    const std::vector<const void*>& data,
    const std::vector<int64_t>& sizes) {
  ReadTable table{};
  table.count = span.count;
  for (int k = 0; k < span.count; ++k) {
    table.data[k] = data[span.first + k];
    table.size[k] = sizes[span.first + k];
    table.block_end[k] = span.block_end[k];
  }
  return table;
}

// A shape and strides by value (MLX's integer vectors); false if more axes
// than kMaxDims.
template <typename ShapeT, typename StridesT>
bool to_read_shape(
    const ShapeT& shape, const StridesT& strides, ReadShape& out) {
  if (shape.size() > size_t(kMaxDims)) {
    return false;
  }
  out.ndim = static_cast<int32_t>(shape.size());
  for (int d = 0; d < out.ndim; ++d) {
    out.shape[d] = shape[d];
    out.strides[d] = strides[d];
  }
  return true;
}

// A plan_strided layout by value; false if it has more axes than kMaxDims.
inline bool
to_strided_args(const launch::StridedLayout& layout, StridedArgs& out) {
  if (layout.ndim() > kMaxDims) {
    return false;
  }
  out.ndim = layout.ndim();
  for (int d = 0; d < out.ndim; ++d) {
    out.shape[d] = layout.shape[d];
    for (int op = 0; op < launch::kLayoutOperands; ++op) {
      out.strides[op][d] = layout.strides[op][d];
    }
  }
  return true;
}

// Threads of a strided launch: one per column and band of kRowsPerThread
// rows of every outer index (as the Metal general kernel).
inline int64_t strided_threads(const launch::StridedLayout& layout) {
  const int64_t bands =
      (layout.rows() + launch::kRowsPerThread - 1) / launch::kRowsPerThread;
  return layout.outer_size() * layout.cols() * bands;
}

inline int64_t blocks_for(int64_t threads) {
  return (threads + kThreads - 1) / kThreads;
}

} // namespace cuda_launch
} // namespace mlx_fused_sgd
