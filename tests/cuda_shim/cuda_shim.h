// A stand-in for the CUDA runtime so that kernels/*.cuh compile as C++ on
// Linux (tests/cuda_harness.cpp). Only what our kernels use: the function and
// parameter qualifiers (ignored), dim3, threadIdx/blockIdx, __half and
// __nv_bfloat16, __shfl_down_sync and __syncthreads over a block's threads,
// and atomicAdd/atomicOr (one host thread runs everything).
//
// A block's threads run as fibers (tests/gpu_fibers.h); blocks run one after
// another. __shfl_down_sync resolves once every thread of a warp (32
// consecutive threads, all of them: the kernels pass a full mask) waits
// there with the same offset: each gets the value of the thread `offset`
// lanes up, or its own past the warp's end, as on a GPU. __syncthreads
// resolves once every thread of the block waits there; a thread that
// returned before it, or threads stuck in different operations, mark the
// block divergent, which the harness reports. __shared__ arrays are static:
// shared by the fibers, which run one block at a time.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <functional>

#include "../gpu_fibers.h"
#include "../gpu_types.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __grid_constant__
#define __shared__ static

// A misaligned vector load or store faults on a GPU: abort here too.
#define MFS_CHECK_ALIGNED(pointer, bytes)                                      \
  if (reinterpret_cast<uintptr_t>(pointer) % (bytes) != 0) {                   \
    std::abort();                                                              \
  }

using __half = _Float16;
using __nv_bfloat16 = mfs_gpu_types::BFloat16;

struct dim3 {
  unsigned x = 1;
  unsigned y = 1;
  unsigned z = 1;
};

namespace mfs_cuda {

constexpr unsigned kWarp = 32;

enum Op { kShuffle = 1, kBarrier = 2 };

// The block being run (set by the launcher) and the running thread's index
// in it (the fiber's).
inline dim3& block_index() {
  static dim3 index;
  return index;
}

inline dim3 thread_index() {
  auto* g = mfs_fibers::active();
  return dim3{g != nullptr ? g->current : 0u, 0u, 0u};
}

using mfs_fibers::Group;
using mfs_fibers::State;

// Resolves what can be resolved; false if nothing could (divergent).
inline bool resolve(Group& g) {
  const unsigned n = static_cast<unsigned>(g.states.size());
  bool progress = false;
  for (unsigned s = 0; s < n; s += kWarp) {
    const unsigned end = std::min(n, s + kWarp);
    bool all_at_shuffle = end - s == kWarp;
    for (unsigned i = s; i < end && all_at_shuffle; ++i) {
      all_at_shuffle = g.states[i] == State::waiting && g.ops[i] == kShuffle &&
                       g.args[i] == g.args[s];
    }
    if (!all_at_shuffle) {
      continue;
    }
    const unsigned offset = static_cast<unsigned>(g.args[s]);
    for (unsigned i = s; i < end; ++i) {
      g.results[i] = i + offset < end ? g.values[i + offset] : g.values[i];
    }
    for (unsigned i = s; i < end; ++i) {
      g.states[i] = State::running;
    }
    progress = true;
  }
  if (progress) {
    return true;
  }
  for (unsigned i = 0; i < n; ++i) {
    if (g.states[i] != State::waiting || g.ops[i] != kBarrier) {
      return false; // left early, or stuck in a warp function
    }
  }
  for (unsigned i = 0; i < n; ++i) {
    g.states[i] = State::running;
  }
  return true;
}

// Whether launches run their blocks last to first: a GPU runs blocks in no
// set order, and a result must not depend on it.
inline bool& reverse_blocks() {
  static bool reverse = false;
  return reverse;
}

// Runs a launch of `blocks` blocks of `threads` threads: kernel() for each
// thread; false if a block diverged.
inline bool
launch(int64_t blocks, unsigned threads, const std::function<void()>& kernel) {
  for (int64_t k = 0; k < blocks; ++k) {
    const int64_t b = reverse_blocks() ? blocks - 1 - k : k;
    block_index() = dim3{static_cast<unsigned>(b), 0u, 0u};
    if (!mfs_fibers::run(threads, [&](unsigned) { kernel(); }, resolve)) {
      return false;
    }
  }
  return true;
}

} // namespace mfs_cuda

#define threadIdx (mfs_cuda::thread_index())
#define blockIdx (mfs_cuda::block_index())

inline float __shfl_down_sync(unsigned, float value, int offset) {
  return mfs_fibers::wait_for(mfs_cuda::kShuffle, value, offset, value);
}

inline void __syncthreads() {
  mfs_fibers::wait_for(mfs_cuda::kBarrier, 0.0f, 0, 0.0f);
}

inline float atomicAdd(float* address, float value) {
  const float old = *address;
  *address = old + value;
  return old;
}

inline unsigned atomicOr(unsigned* address, unsigned value) {
  const unsigned old = *address;
  *address = old | value;
  return old;
}
