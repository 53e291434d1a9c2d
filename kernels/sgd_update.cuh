// CUDA kernels of the fused SGD update. The per-element math is
// kernels/sgd_math.h and the loads and stores around it kernels/sgd_element.h,
// the same headers the CPU loop and the Metal kernels include; the launch
// facts (tables, block size, chunking) are kernels/cuda_launch.h, the same
// header eval_gpu (csrc/cuda/sgd_update.cu) and the host harness use.
//
// Two kernels per variant (template arguments as the Metal kernels'):
//   sgd_multi_tensor: row-contiguous tensors, up to cuda_launch::kMaxTensors
//     a launch (Apex's multi-tensor apply); each block updates one chunk of
//     one tensor, with 16-byte vector loads where every operand is aligned.
//   sgd_strided: one tensor whose operands are not all row-contiguous
//     (transposed, sliced, broadcast), walked as the Metal general kernel.
// Indices are 64-bit throughout.
#pragma once

#include "kernels/cuda_launch.h"
#include "kernels/sgd_element.h"

namespace mlx_fused_sgd {
namespace cuda_kernels {

// A misaligned vector access faults on a GPU; the host model of CUDA
// (tests/cuda_shim) checks for one here.
#ifndef MFS_CHECK_ALIGNED
#define MFS_CHECK_ALIGNED(pointer, bytes)
#endif

// kN elements of T loaded or stored at once (16 bytes of float32).
template <typename T, int kN> struct alignas(sizeof(T) * kN) Vector {
  T x[kN];
};

template <typename T, int kN>
__device__ __forceinline__ void load(const T* from, T* to) {
  MFS_CHECK_ALIGNED(from, sizeof(Vector<T, kN>));
  const Vector<T, kN> v = *reinterpret_cast<const Vector<T, kN>*>(from);
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    to[j] = v.x[j];
  }
}

template <typename T, int kN>
__device__ __forceinline__ void store(const T* from, T* to) {
  MFS_CHECK_ALIGNED(to, sizeof(Vector<T, kN>));
  Vector<T, kN> v;
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    v.x[j] = from[j];
  }
  *reinterpret_cast<Vector<T, kN>*>(to) = v;
}

// kVector consecutive elements from index i of a tensor whose operands are
// all aligned: loaded into registers, updated there, stored back.
template <typename T, typename V, bool M, int R>
__device__ __forceinline__ void update_vector(
    const element::TensorBuffers<T, V>& b,
    int64_t i,
    math::StepScalars s,
    const math::SGDHyper& h,
    uint64_t stream,
    bool copy) {
  constexpr int kN = cuda_launch::kVector;
  constexpr bool kUseMaster = R == math::kMasterWeights;
  T p[kN], g[kN], p_out[kN];
  V v[kN], v_out[kN];
  float m[kN], m_out[kN];
  load<T, kN>(b.param + i, p);
  load<T, kN>(b.grad + i, g);
  if (M) {
    load<V, kN>(b.velocity + i, v);
  }
  if (kUseMaster) {
    load<float, kN>(b.master + i, m);
  }
  const element::TensorBuffers<T, V> regs = {p, g, v, p_out, v_out, m, m_out};
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    element::update_one<T, V, M, R>(
        regs,
        element::Offsets{j, j, j, j, j},
        uint64_t(i + j),
        s,
        h,
        stream,
        copy);
  }
  store<T, kN>(p_out, b.param_out + i);
  if (M) {
    store<V, kN>(v_out, b.velocity_out + i);
  }
  if (kUseMaster) {
    store<float, kN>(m_out, b.master_out + i);
  }
}

template <typename T, typename V, bool M, int R>
__global__ void sgd_multi_tensor(
    const __grid_constant__ cuda_launch::SGDTable table,
    const __grid_constant__ launch::SGDArgs args,
    const cuda_launch::SGDScalars scalars) {
  const int64_t block = blockIdx.x;
  const int t = launch::span_tensor(table.block_end, table.count, block);
  const int64_t first = t == 0 ? 0 : table.block_end[t - 1];
  const int64_t size = table.size[t];
  const int64_t begin = (block - first) * cuda_launch::kChunk;
  const int64_t left = size - begin;
  const int64_t end =
      begin + (left < cuda_launch::kChunk ? left : cuda_launch::kChunk);
  const bool copy = args.has_skip && scalars.skip[0] != 0;
  const math::StepScalars s = element::launch_step_scalars(
      scalars.lr, scalars.step, scalars.grad_scale, scalars.clip_factor, args);
  const uint64_t stream = element::launch_rounding_stream<R>(
      scalars.rounding_step, args.rounding_seed, table.tensor_id[t]);
  const element::TensorBuffers<T, V> b = {
      static_cast<const T*>(table.param[t]),
      static_cast<const T*>(table.grad[t]),
      static_cast<const V*>(table.velocity[t]),
      static_cast<T*>(table.param_out[t]),
      static_cast<V*>(table.velocity_out[t]),
      table.master[t],
      table.master_out[t]};
  if (((table.vector_ok >> t) & 1u) && end - begin == cuda_launch::kChunk) {
    // A whole chunk: each step of the block one coalesced run of vectors.
#pragma unroll
    for (int k = 0; k < cuda_launch::kVectorsPerThread; ++k) {
      const int64_t i =
          begin + (int64_t(k) * cuda_launch::kThreads + threadIdx.x) *
                      cuda_launch::kVector;
      update_vector<T, V, M, R>(b, i, s, args.hyper, stream, copy);
    }
    return;
  }
  for (int64_t i = begin + threadIdx.x; i < end; i += cuda_launch::kThreads) {
    element::update_one<T, V, M, R>(
        b,
        element::Offsets{i, i, i, i, i},
        uint64_t(i),
        s,
        args.hyper,
        stream,
        copy);
  }
}

template <typename T, typename V, bool M, int R>
__global__ void sgd_strided(
    const element::TensorBuffers<T, V> b,
    const __grid_constant__ launch::SGDArgs args,
    const __grid_constant__ cuda_launch::StridedArgs layout,
    const cuda_launch::SGDScalars scalars) {
  const int64_t t = int64_t(blockIdx.x) * cuda_launch::kThreads + threadIdx.x;
  element::Band band;
  if (!element::band_of(t, layout.shape, layout.ndim, args.size, band)) {
    return;
  }
  const bool copy = args.has_skip && scalars.skip[0] != 0;
  const math::StepScalars s = element::launch_step_scalars(
      scalars.lr, scalars.step, scalars.grad_scale, scalars.clip_factor, args);
  const uint64_t stream = element::launch_rounding_stream<R>(
      scalars.rounding_step, args.rounding_seed, args.rounding_tensor);
  const element::LayoutStrides strides = {
      layout.strides[launch::kLayoutParam],
      layout.strides[launch::kLayoutGrad],
      layout.strides[launch::kLayoutVelocity],
      layout.strides[launch::kLayoutMaster],
      layout.strides[launch::kLayoutOut]};
  element::update_band<T, V, M, R>(
      b,
      layout.shape,
      strides,
      layout.ndim,
      band,
      s,
      args.hyper,
      stream,
      copy);
}

} // namespace cuda_kernels
} // namespace mlx_fused_sgd
