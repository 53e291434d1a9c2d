// The CPU loops of the fused SGD update. csrc/cpu/sgd_cpu_kernel.cpp is
// compiled once per instruction set (generic, and AVX2 and AVX-512 on x86-64);
// the best one this CPU runs is chosen once, at first use.
#pragma once

#include <cstdint>

#include "mlx/array.h"

#include "kernels/sgd_plan.h"
#include "kernels/sgd_math.h"

namespace mlx_fused_sgd {
namespace cpu_kernel {

namespace mx = mlx::core;

// Tiles of the strided loop. Operands contiguous along the layout's columns
// are read in place, a row at a time; transposed operands (contiguous along
// the rows) are gathered a tile at a time into a heap buffer, in blocks
// transposed in registers (4 columns x 8 rows of 4-byte elements, 8 x 8 of
// 2-byte ones), each block read as runs along the operand's contiguous axis;
// any other operand (sliced with a step, broadcast) is gathered row by row.
// Then the same vector loop as the contiguous path runs over each row of the
// tile.
//
// With a transposed operand a tile is kTileRows rows of the full width (up
// to kTileBudget / kTileRows columns): the row-major operands then stream
// through whole rows in order, and the transposed one is read in runs of
// kTileRows elements. Measured on a 1024-2048-2048-1024 MLP's real
// gradients (2-core x86-64): 256 rows x full width 5.1 ms a step, 128 x full
// width 5.3, 64 x 128 tiles 5.8, 256 x half width 6.1 (three interleaved
// runs each). Without a transposed operand a tile is one row of up to
// kRowTile elements.
//
// The buffer's rows are kTilePad elements longer than the tile: with a
// power-of-two width, the rows a block writes would otherwise fall in one L1
// set (a standalone gather of a 2048 x 2048 matrix took 4 times as long
// unpadded; any pad from 4 to 48 elements measured alike). The gather also
// prefetches the lines 4 strips of columns ahead into L2 (the runs along a
// column are too short for the hardware prefetcher to warm up). Measured on
// one 2048 x 2048 update with a transposed gradient, 2 threads: 1.8-2.3 ms
// unpadded, 1.7-1.9 padded, 1.6-1.8 padded and prefetched, against 0.85-1.0
// ms with a contiguous gradient.
inline constexpr int64_t kTileRows = 256;
inline constexpr int64_t kTileBudget = int64_t(1) << 19; // elements
inline constexpr int64_t kRowTile = 8192;
inline constexpr int64_t kTilePad = 32; // elements

// A tensor's layout (launch::plan_strided) cut into tiles: `units` tiles in
// the order outer index, row tile, column tile (fastest).
struct StridedWalk {
  launch::StridedLayout layout;
  int64_t tile_rows = 1;
  int64_t tile_cols = 1;
  int64_t tile_ld = 1; // a gather buffer's row pitch (kTilePad)
  int64_t row_tiles = 0;
  int64_t col_tiles = 0;
  int64_t units = 0;
};

// The tiles of a tensor's layout.
StridedWalk plan_walk(launch::StridedLayout layout);

// One tensor of a chunk, as the loops see it.
struct TensorPointers {
  const void* param;
  const void* grad;
  const void* velocity;
  void* param_out;
  void* velocity_out;
  int64_t size;
  // Not every operand row-contiguous (a transposed gradient, a sliced or
  // broadcast input): the strided loop walks `walk`.
  bool contiguous;
  // Master weights: the float32 copy read in place of the param, and where
  // its update goes.
  const float* master = nullptr;
  float* master_out = nullptr;
  StridedWalk walk;
  // Stochastic rounding: this tensor's index in the update, and its random
  // stream (math::rounding_stream), set when the step counter is read.
  uint64_t rounding_tensor = 0;
  uint64_t rounding_stream = 0;
};

using launch::ElementType;

// What the loops are compiled for, per chunk: what changes the types or the
// memory traffic (the other options are math::SGDHyper's run-time flags).
struct KernelKey {
  ElementType dtype;
  ElementType state_dtype; // the momentum buffer's: the param's, or float32
  bool momentum;
  int rounding; // math::kRoundNearest, kRoundStochastic or kMasterWeights
};

// Updates elements [begin, end) of one tensor.
using UpdateRangeFn = void(
    const KernelKey& key,
    const TensorPointers& t,
    int64_t begin,
    int64_t end,
    math::StepScalars s,
    math::SGDHyper h);
using UpdateRange = UpdateRangeFn*;

// The gradient reads before an update, over contiguous elements [begin,
// end) of one tensor: the sum of squares (max_grad_norm) in 16 independent
// double lanes, so every instruction set adds in the same order; and whether
// any element is NaN or Inf (skip_nonfinite).
using SqSumRangeFn =
    double(ElementType dtype, const void* data, int64_t begin, int64_t end);
using NonfiniteRangeFn =
    bool(ElementType dtype, const void* data, int64_t begin, int64_t end);

// The loops of one instruction set.
struct Loops {
  UpdateRangeFn* update;
  SqSumRangeFn* sq_sum;
  NonfiniteRangeFn* nonfinite;
  const char* isa;
};

// One set per instruction set; each runs contiguous and strided tensors.
extern const Loops loops_generic;
#if defined(__x86_64__) || defined(_M_X64)
#define MFS_X86_KERNELS 1
extern const Loops loops_avx2;
extern const Loops loops_avx512;
#endif

// A skipped step (skip_nonfinite): copies elements [begin, end) of the param,
// momentum buffer and master copy to the outputs (in place: a no-op).
void copy_range(
    const KernelKey& key, const TensorPointers& t, int64_t begin, int64_t end);

// The loops for this CPU: the widest instruction set it (and its OS)
// supports, unless MLX_FUSED_SGD_CPU_ISA=generic|avx2|avx512 asks for another.
const Loops& selected_loops();

UpdateRange select_update_range();

// The name of the instruction set selected_loops() picks.
const char* selected_isa();

} // namespace cpu_kernel
} // namespace mlx_fused_sgd
