// The CPU loops of the fused SGD update, compiled once per instruction set:
// CMake builds this file with MFS_CPU_ISA=generic (no flags), and on x86-64
// again with MFS_CPU_ISA=avx2 (-mavx2) and MFS_CPU_ISA=avx512 (-mavx512f).
// Everything here has internal linkage or is always inlined, so no copy
// compiled for a wider instruction set can stand in for the generic one.
#include "sgd_cpu_kernel.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <utility>

#ifndef MFS_CPU_ISA
#error "compile with -DMFS_CPU_ISA=generic|avx2|avx512"
#endif

#define MFS_CAT2(a, b) a##b
#define MFS_CAT(a, b) MFS_CAT2(a, b)
#define MFS_STR2(a) #a
#define MFS_STR(a) MFS_STR2(a)
#define MFS_LOOP_INLINE inline __attribute__((always_inline))
#if defined(__clang__)
#define MFS_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#else
#define MFS_IVDEP _Pragma("GCC ivdep")
#endif

namespace mlx_fused_sgd {
namespace cpu_kernel {
namespace {

// Element loads and stores in float32. Where MLX's half types are its
// software structs (x86; not ARM's native types), they are converted here, on
// their bits, with MLX's own algorithms and so to MLX's bits (NaN included):
// bfloat16 widens by a shift and narrows by round-to-nearest-even; float16
// follows FP16's (Maratyszcza) magic-number conversions, as MLX's does. Here
// they are branch-free with internal linkage: the loops vectorize, and no
// out-of-line copy compiled for a wider instruction set can be shared with
// the generic loop.
#ifndef __ARM_FEATURE_BF16
template <typename T>
constexpr bool kBFloat16Bits = std::is_same_v<T, mx::bfloat16_t>;
#else
template <typename T> constexpr bool kBFloat16Bits = false;
#endif
#ifndef __ARM_FEATURE_FP16_SCALAR_ARITHMETIC
template <typename T>
constexpr bool kFloat16Bits = std::is_same_v<T, mx::float16_t>;
#else
template <typename T> constexpr bool kFloat16Bits = false;
#endif

MFS_LOOP_INLINE float as_float(uint32_t bits) {
  return __builtin_bit_cast(float, bits);
}

MFS_LOOP_INLINE uint32_t as_bits(float x) {
  return __builtin_bit_cast(uint32_t, x);
}

template <typename T> MFS_LOOP_INLINE float load(const T* p, int64_t i) {
  if constexpr (kBFloat16Bits<T> || kFloat16Bits<T>) {
    uint32_t h = reinterpret_cast<const uint16_t*>(p)[i];
    if constexpr (kBFloat16Bits<T>) {
      return as_float(h << 16);
    } else {
      uint32_t sign = (h << 16) & 0x80000000u;
      uint32_t two_base = h << 17;
      float denormal = as_float((126u << 23) | (two_base >> 17)) - 0.5f;
      float unscaled = as_float((0xE0u << 23) + (two_base >> 4));
      float normal = as_float(0x7800000u) * unscaled;
      // Branch-free select (the loop vectorizer takes no branches here).
      uint32_t use_denormal = 0u - uint32_t(two_base < (1u << 27));
      uint32_t magnitude = (as_bits(denormal) & use_denormal) |
                           (as_bits(normal) & ~use_denormal);
      return as_float(magnitude | sign);
    }
  } else {
    return static_cast<float>(p[i]);
  }
}

template <typename T> MFS_LOOP_INLINE void store(T* p, int64_t i, float x) {
  if constexpr (kBFloat16Bits<T> || kFloat16Bits<T>) {
    uint32_t bits = as_bits(x);
    bool nan = (bits & 0x7FFFFFFFu) > 0x7F800000u;
    uint32_t out;
    if constexpr (kBFloat16Bits<T>) {
      uint32_t rounded = (bits + ((bits >> 16) & 1u) + 0x7FFFu) >> 16;
      out = nan ? 0x7FC0u : rounded;
    } else {
      uint32_t sign = (bits & 0x80000000u) >> 16;
      uint32_t exponent = bits & 0x7F800000u;
      exponent = std::max(exponent, 0x38800000u);
      exponent += 15u << 23;
      float magnitude = as_float(bits & 0x7FFFFFFFu);
      float scaled =
          (magnitude * as_float(0x77800000u)) * as_float(0x08800000u);
      uint32_t magic = as_bits(as_float(exponent) + scaled);
      uint32_t rounded = ((magic >> 13) & 0x7C00u) + (magic & 0x0FFFu);
      uint32_t is_nan = 0u - uint32_t(nan);
      out = sign | (0x7D00u & is_nan) | (rounded & 0xFFFFu & ~is_nan);
    }
    reinterpret_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(out);
  } else {
    p[i] = static_cast<T>(x);
  }
}

// x rounded to T as store() rounds it, widened back (exact).
template <typename T> MFS_LOOP_INLINE float rounded_to(float x) {
  T t;
  store(&t, 0, x);
  return load(&t, 0);
}

// Unit-stride pointers to one run of elements of a tensor's update; absent
// operands (no momentum, no master copy) are nullptr.
template <typename T, typename V> struct RowPointers {
  const T* p;
  const T* g;
  const V* v;
  const float* m;
  T* p_out;
  V* v_out;
  float* m_out;
};

// The update of n consecutive elements, the first of which is element io of
// the tensor in row-major order (it keys the stochastic rounding bits). An
// output may share its buffer with an input (donation), always at the same
// offset, so every element is read before it is written and no element is
// read after another one is written: safe to vectorize, which the pragma
// tells the compiler (it cannot prove it, and would otherwise check for
// overlap at run time and take a scalar loop for the in-place case).
template <typename T, typename V, bool M, int R>
MFS_LOOP_INLINE void sgd_row(
    const RowPointers<T, V>& row,
    int64_t n,
    int64_t io,
    uint64_t stream,
    math::StepScalars s,
    math::SGDHyper h) {
  const T* p = row.p;
  const T* g = row.g;
  const V* v = row.v;
  const float* master = row.m;
  T* p_out = row.p_out;
  V* v_out = row.v_out;
  float* master_out = row.m_out;
  MFS_IVDEP
  for (int64_t i = 0; i < n; ++i) {
    float pi = load(p, i);
    if (R == math::kMasterWeights) {
      pi = math::master_or_param(master[i], rounded_to<T>(master[i]), pi);
    }
    float vi = M ? load(v, i) : 0.0f;
    auto r = math::sgd_update_element<M>(pi, load(g, i), vi, s, h);
    if (R == math::kMasterWeights) {
      master_out[i] = r.param;
    }
    if (R == math::kRoundStochastic) {
      r.param = math::round_bf16_stochastic(
          r.param, math::rounding_bits(stream, uint64_t(io + i)));
    }
    store(p_out, i, r.param);
    if (M) {
      store(v_out, i, r.velocity);
    }
  }
}

template <typename P> MFS_LOOP_INLINE P* offset(P* p, int64_t k) {
  return p == nullptr ? p : p + k;
}

// The row pointers of elements [begin, ...) of a row-contiguous tensor.
template <typename T, typename V>
MFS_LOOP_INLINE RowPointers<T, V>
contiguous_row(const TensorPointers& t, int64_t begin) {
  return {
      offset(static_cast<const T*>(t.param), begin),
      offset(static_cast<const T*>(t.grad), begin),
      offset(static_cast<const V*>(t.velocity), begin),
      offset(t.master, begin),
      offset(static_cast<T*>(t.param_out), begin),
      offset(static_cast<V*>(t.velocity_out), begin),
      offset(t.master_out, begin)};
}

// Where one input operand's rows of a tile come from: its own memory (step
// between rows: its row stride) or the tile buffer it was gathered into.
template <typename X> struct TileSource {
  const X* data;
  int64_t row_step;
};

// Blocks transposed in registers on their bits (GCC and clang vector
// extensions, lowered to each instruction set's own shuffles). Rows are
// loaded and stored through unaligned, may-alias vector types, each one
// named: loads through memcpy into an array of vectors were compiled (GCC
// 12, -mavx2) into a round trip through the stack, whose 16-byte stores
// could not be forwarded to the 32-byte loads after them.
//
// The helpers pass 32-byte vectors by value; in the generic build (no AVX)
// GCC warns that this changes the ABI. They are always inlined, so no call
// crosses an ABI boundary. (Ignored to the end of the file: GCC reports the
// warning at the end of the translation unit, after a pop.)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
typedef uint32_t Bits32x8 __attribute__((vector_size(32)));
typedef uint32_t Bits32x4 __attribute__((vector_size(16)));
typedef uint16_t Bits16x8 __attribute__((vector_size(16)));
typedef uint32_t Bits32x8Unaligned
    __attribute__((vector_size(32), aligned(1), may_alias));
typedef uint32_t Bits32x4Unaligned
    __attribute__((vector_size(16), aligned(1), may_alias));
typedef uint16_t Bits16x8Unaligned
    __attribute__((vector_size(16), aligned(1), may_alias));

MFS_LOOP_INLINE Bits32x8 load_row(const unsigned char* p, Bits32x8) {
  return *reinterpret_cast<const Bits32x8Unaligned*>(p);
}
MFS_LOOP_INLINE Bits16x8 load_row(const unsigned char* p, Bits16x8) {
  return *reinterpret_cast<const Bits16x8Unaligned*>(p);
}
MFS_LOOP_INLINE void store_row(unsigned char* p, Bits32x4 x) {
  *reinterpret_cast<Bits32x4Unaligned*>(p) = x;
}
MFS_LOOP_INLINE void store_row(unsigned char* p, Bits16x8 x) {
  *reinterpret_cast<Bits16x8Unaligned*>(p) = x;
}

// Four rows a0..a3 of 8 elements after two rounds of interleaving: r_k
// holds element k of a0..a3 in its low half and element k + 4 in its high
// half (rows k and k + 4 of the 8 x 4 transpose).
template <typename Rows> struct FourRows {
  Rows r0, r1, r2, r3;
};

template <typename Rows>
MFS_LOOP_INLINE FourRows<Rows> interleave4(Rows a0, Rows a1, Rows a2, Rows a3) {
  const Rows t0 = __builtin_shufflevector(a0, a1, 0, 8, 1, 9, 4, 12, 5, 13);
  const Rows t1 = __builtin_shufflevector(a0, a1, 2, 10, 3, 11, 6, 14, 7, 15);
  const Rows t2 = __builtin_shufflevector(a2, a3, 0, 8, 1, 9, 4, 12, 5, 13);
  const Rows t3 = __builtin_shufflevector(a2, a3, 2, 10, 3, 11, 6, 14, 7, 15);
  return {
      __builtin_shufflevector(t0, t2, 0, 1, 8, 9, 4, 5, 12, 13),
      __builtin_shufflevector(t0, t2, 2, 3, 10, 11, 6, 7, 14, 15),
      __builtin_shufflevector(t1, t3, 0, 1, 8, 9, 4, 5, 12, 13),
      __builtin_shufflevector(t1, t3, 2, 3, 10, 11, 6, 7, 14, 15)};
}

template <typename Rows>
MFS_LOOP_INLINE FourRows<Rows>
load_interleave4(const unsigned char* src, int64_t src_ld) {
  return interleave4(
      load_row(src, Rows{}),
      load_row(src + src_ld, Rows{}),
      load_row(src + 2 * src_ld, Rows{}),
      load_row(src + 3 * src_ld, Rows{}));
}

// 8 x 8 blocks of 2-byte elements: each half of the block interleaved
// twice, then a third round across the halves.
MFS_LOOP_INLINE void transpose8x8(
    const unsigned char* src,
    int64_t src_ld,
    unsigned char* dst,
    int64_t dst_ld) {
  const auto top = load_interleave4<Bits16x8>(src, src_ld);
  const auto bottom = load_interleave4<Bits16x8>(src + 4 * src_ld, src_ld);
  auto store_pair = [&](int i, Bits16x8 x, Bits16x8 y) {
    store_row(
        dst + i * dst_ld,
        __builtin_shufflevector(x, y, 0, 1, 2, 3, 8, 9, 10, 11));
    store_row(
        dst + (i + 4) * dst_ld,
        __builtin_shufflevector(x, y, 4, 5, 6, 7, 12, 13, 14, 15));
  };
  store_pair(0, top.r0, bottom.r0);
  store_pair(1, top.r1, bottom.r1);
  store_pair(2, top.r2, bottom.r2);
  store_pair(3, top.r3, bottom.r3);
}

// 4 columns x 8 rows of 4-byte elements (4 rows of `src`, each 8 elements of
// one column's run) to 8 rows x 4 columns of `dst`: interleaved twice, each
// register's halves are then two rows.
MFS_LOOP_INLINE void transpose4x8(
    const unsigned char* src,
    int64_t src_ld,
    unsigned char* dst,
    int64_t dst_ld) {
  const auto u = load_interleave4<Bits32x8>(src, src_ld);
  auto store_halves = [&](int i, Bits32x8 x) {
    store_row(dst + i * dst_ld, __builtin_shufflevector(x, x, 0, 1, 2, 3));
    store_row(
        dst + (i + 4) * dst_ld, __builtin_shufflevector(x, x, 4, 5, 6, 7));
  };
  store_halves(0, u.r0);
  store_halves(1, u.r1);
  store_halves(2, u.r2);
  store_halves(3, u.r3);
}

// buf[r * ld + c] = x[c * col_stride + r] for an nr x nc tile, in strips of
// kStrip columns down all rows of the tile: 4 x 8 blocks (4-byte elements)
// or 8 x 8 blocks (2-byte elements) transposed in registers, the edges one
// element at a time.
//
// Why 4 columns at a time for 4-byte elements: a transposed operand's
// columns are usually a power of two of bytes apart, so the lines a block
// reads at the same rows of different columns fall in one L1 set; 8 columns
// fill an 8-way set and evict each other (and the lines prefetched for the
// next strip) before a line's second block reads it. With 4 columns and the
// prefetch 4 strips ahead, measured on the 1024-2048-2048-1024 MLP's three
// transposed weight updates (2 threads, 2-core x86-64, 11 interleaved
// rounds, twice): 0.85-0.90x the time of 8 x 8 blocks prefetching one strip
// ahead.
template <typename X>
MFS_LOOP_INLINE void gather_transposed(
    const X* x,
    int64_t col_stride,
    int64_t nr,
    int64_t nc,
    int64_t ld,
    X* buf) {
  static_assert(sizeof(X) == 4 || sizeof(X) == 2);
  constexpr int64_t kStrip = sizeof(X) == 4 ? 4 : 8;
  constexpr int64_t kAhead = sizeof(X) == 4 ? 4 * kStrip : kStrip;
  const int64_t nr8 = nr & ~int64_t(7);
  const int64_t ncs = nc - nc % kStrip;
  for (int64_t c = 0; c < ncs; c += kStrip) {
    for (int64_t r = 0; r < nr8; r += 8) {
      // Once per cache line: the same rows of the strip kAhead columns on
      // (the runs along a column are too short for the hardware prefetcher).
      if (c + kAhead < ncs && (r * int64_t(sizeof(X))) % 64 == 0) {
        for (int64_t j = 0; j < kStrip; ++j) {
          __builtin_prefetch(x + (c + kAhead + j) * col_stride + r, 0, 2);
        }
      }
      const auto* src =
          reinterpret_cast<const unsigned char*>(x + c * col_stride + r);
      auto* dst = reinterpret_cast<unsigned char*>(buf + r * ld + c);
      const int64_t src_ld = col_stride * int64_t(sizeof(X));
      const int64_t dst_ld = ld * int64_t(sizeof(X));
      if constexpr (sizeof(X) == 4) {
        transpose4x8(src, src_ld, dst, dst_ld);
      } else {
        transpose8x8(src, src_ld, dst, dst_ld);
      }
    }
  }
  for (int64_t c = 0; c < nc; ++c) {
    const X* column = x + c * col_stride;
    for (int64_t r = c < ncs ? nr8 : 0; r < nr; ++r) {
      buf[r * ld + c] = column[r];
    }
  }
}

// Operand `x` (already offset to the tile's first element) for a tile of nr
// x nc elements. Contiguous along the columns: read in place. Transposed
// (contiguous along the rows): gathered in 8 x 8 blocks. Otherwise gathered
// row by row (a stride of 0 is a broadcast).
template <typename X>
MFS_LOOP_INLINE TileSource<X> tile_source(
    const X* x,
    int64_t row_stride,
    int64_t col_stride,
    int64_t nr,
    int64_t nc,
    int64_t ld,
    X* buf) {
  if (x == nullptr) {
    return {nullptr, 0};
  }
  if (col_stride == 1) {
    return {x, row_stride};
  }
  if (nr > 1 && row_stride == 1) {
    gather_transposed(x, col_stride, nr, nc, ld, buf);
  } else {
    for (int64_t r = 0; r < nr; ++r) {
      const X* in = x + r * row_stride;
      X* out = buf + r * ld;
      for (int64_t c = 0; c < nc; ++c) {
        out[c] = in[c * col_stride];
      }
    }
  }
  return {buf, ld};
}

// Walks the tiles of a strided tensor that hold elements [begin, end) of
// its row-major order and calls row_op(rows, n, io) for every row of every
// tile, with unit-stride pointers (see kTileRows). Whole tiles: element i
// maps to tile i * units / size, so shares that partition the elements
// partition the tiles. The outer index is decoded once per tile; no division
// per element. The grad is read only when with_grad.
template <typename T, typename V, typename RowOp>
MFS_LOOP_INLINE void walk_strided(
    const TensorPointers& t,
    int64_t begin,
    int64_t end,
    bool with_grad,
    RowOp row_op) {
  const StridedWalk& w = t.walk;
  const launch::StridedLayout& layout = w.layout;
  if (t.size == 0 || w.units == 0) {
    return;
  }
  auto tile_of = [&](int64_t e) {
    return static_cast<int64_t>(
        static_cast<unsigned __int128>(e) * w.units / t.size);
  };
  const int64_t u_begin = tile_of(begin);
  const int64_t u_end = tile_of(end);
  const int nd = layout.ndim();
  const int64_t rows = layout.rows();
  const int64_t cols = layout.cols();
  const int64_t ld = w.tile_ld;
  const T* param = static_cast<const T*>(t.param);
  const T* grad = with_grad ? static_cast<const T*>(t.grad) : nullptr;
  const V* velocity = static_cast<const V*>(t.velocity);
  // Tile buffers on the heap, one per operand that is gathered (threads'
  // stacks are small on macOS): one allocation per call, not per tile
  // (measured no slower than a per-thread buffer kept between calls).
  const void* data[] = {param, grad, velocity, t.master};
  const size_t item[] = {sizeof(T), sizeof(T), sizeof(V), sizeof(float)};
  const size_t tile = static_cast<size_t>(w.tile_rows * w.tile_ld);
  size_t at[launch::kLayoutOut];
  size_t bytes = 0;
  for (int op = 0; op < launch::kLayoutOut; ++op) {
    at[op] = bytes;
    if (data[op] != nullptr && layout.col_stride(op) != 1) {
      // Whole 64-byte lines each: a float buffer after a half-precision one
      // of an odd number of elements stays aligned.
      bytes += (tile * item[op] + 63) & ~size_t(63);
    }
  }
  std::unique_ptr<unsigned char[]> owned;
  if (bytes > 0) {
    owned = std::make_unique_for_overwrite<unsigned char[]>(bytes);
  }
  unsigned char* buffers = owned.get();
  auto buffer = [&]<typename X>(int op) {
    return reinterpret_cast<X*>(buffers + at[op]);
  };
  T* p_buf = buffer.template operator()<T>(launch::kLayoutParam);
  T* g_buf = buffer.template operator()<T>(launch::kLayoutGrad);
  V* v_buf = buffer.template operator()<V>(launch::kLayoutVelocity);
  float* m_buf = buffer.template operator()<float>(launch::kLayoutMaster);
  for (int64_t u = u_begin; u < u_end; ++u) {
    const int64_t c0 = (u % w.col_tiles) * w.tile_cols;
    const int64_t rest = u / w.col_tiles;
    const int64_t r0 = (rest % w.row_tiles) * w.tile_rows;
    int64_t outer = rest / w.row_tiles;
    const int64_t nr = std::min(w.tile_rows, rows - r0);
    const int64_t nc = std::min(w.tile_cols, cols - c0);
    int64_t base[launch::kLayoutOperands];
    for (int op = 0; op < launch::kLayoutOperands; ++op) {
      base[op] = r0 * layout.row_stride(op) + c0 * layout.col_stride(op);
    }
    for (int d = nd - 3; d >= 0 && outer > 0; --d) {
      const int64_t index = outer % layout.shape[d];
      outer /= layout.shape[d];
      for (int op = 0; op < launch::kLayoutOperands; ++op) {
        base[op] += index * layout.strides[op][d];
      }
    }
    auto source = [&]<typename X>(int op, const X* data, X* buf) {
      return tile_source<X>(
          offset(data, base[op]),
          layout.row_stride(op),
          layout.col_stride(op),
          nr,
          nc,
          ld,
          buf);
    };
    const auto p = source(launch::kLayoutParam, param, p_buf);
    const auto g = source(launch::kLayoutGrad, grad, g_buf);
    const auto v = source(launch::kLayoutVelocity, velocity, v_buf);
    const auto m = source(launch::kLayoutMaster, t.master, m_buf);
    const int64_t out_row_stride = layout.row_stride(launch::kLayoutOut);
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t io = base[launch::kLayoutOut] + r * out_row_stride;
      const RowPointers<T, V> row = {
          p.data + r * p.row_step,
          g.data + r * g.row_step,
          v.data + r * v.row_step,
          m.data + r * m.row_step,
          offset(static_cast<T*>(t.param_out), io),
          offset(static_cast<V*>(t.velocity_out), io),
          offset(t.master_out, io)};
      row_op(row, nc, io);
    }
  }
}

// Updates elements [begin, end) of one tensor (its row-major order).
template <typename T, typename V, bool M, int R>
void sgd_tensor_range(
    const TensorPointers& t,
    int64_t begin,
    int64_t end,
    math::StepScalars s,
    math::SGDHyper h) {
  const uint64_t stream = t.rounding_stream;
  if (t.contiguous) {
    sgd_row<T, V, M, R>(
        contiguous_row<T, V>(t, begin), end - begin, begin, stream, s, h);
    return;
  }
  walk_strided<T, V>(
      t,
      begin,
      end,
      true,
      [&](const RowPointers<T, V>& row, int64_t n, int64_t io) {
        sgd_row<T, V, M, R>(row, n, io, stream, s, h);
      });
}

template <typename T, typename V, int R>
void update_typed(
    const KernelKey& key,
    const TensorPointers& t,
    int64_t begin,
    int64_t end,
    math::StepScalars s,
    math::SGDHyper h) {
  return key.momentum ? sgd_tensor_range<T, V, true, R>(t, begin, end, s, h)
                      : sgd_tensor_range<T, V, false, R>(t, begin, end, s, h);
}

} // namespace

void MFS_CAT(update_range_, MFS_CPU_ISA)(
    const KernelKey& key,
    const TensorPointers& t,
    int64_t begin,
    int64_t end,
    math::StepScalars s,
    math::SGDHyper h) {
  // Half params keep their momentum in their own dtype or in float32, and
  // are stored rounded to nearest, stochastically (bfloat16) or from a
  // float32 master copy.
  auto half_param = [&]<typename T>() {
    auto with_state = [&]<int R>() {
      return key.state_dtype == ElementType::float32
                 ? update_typed<T, float, R>(key, t, begin, end, s, h)
                 : update_typed<T, T, R>(key, t, begin, end, s, h);
    };
    switch (key.rounding) {
    case math::kMasterWeights:
      return with_state.template operator()<math::kMasterWeights>();
    case math::kRoundStochastic:
      if constexpr (std::is_same_v<T, mx::bfloat16_t>) {
        return with_state.template operator()<math::kRoundStochastic>();
      }
      return; // refused by the op before any graph is built
    default:
      return with_state.template operator()<math::kRoundNearest>();
    }
  };
  switch (key.dtype) {
  case ElementType::float32:
    return update_typed<float, float, math::kRoundNearest>(
        key, t, begin, end, s, h);
  case ElementType::bfloat16:
    return half_param.template operator()<mx::bfloat16_t>();
  case ElementType::float16:
    return half_param.template operator()<mx::float16_t>();
  }
}

namespace {

template <typename T>
double sq_sum_typed(const void* data, int64_t begin, int64_t end) {
  auto x = static_cast<const T*>(data);
  // Independent double lanes: the compiler vectorizes them without
  // reassociating any one sum, so every instruction set gives the same bits.
  constexpr int L = 16;
  double lanes[L] = {};
  int64_t i = begin;
  for (; i + L <= end; i += L) {
    for (int j = 0; j < L; ++j) {
      double e = load(x, i + j);
      lanes[j] += e * e;
    }
  }
  double sum = 0.0;
  for (; i < end; ++i) {
    double e = load(x, i);
    sum += e * e;
  }
  for (int j = 0; j < L; ++j) {
    sum += lanes[j];
  }
  return sum;
}

template <typename T>
bool nonfinite_typed(const void* data, int64_t begin, int64_t end) {
  auto x = static_cast<const T*>(data);
  int bad = 0;
  for (int64_t i = begin; i < end; ++i) {
    bad |= math::is_nonfinite(load(x, i));
  }
  return bad != 0;
}

} // namespace

double MFS_CAT(sq_sum_range_, MFS_CPU_ISA)(
    ElementType dtype, const void* data, int64_t begin, int64_t end) {
  switch (dtype) {
  case ElementType::bfloat16:
    return sq_sum_typed<mx::bfloat16_t>(data, begin, end);
  case ElementType::float16:
    return sq_sum_typed<mx::float16_t>(data, begin, end);
  default:
    return sq_sum_typed<float>(data, begin, end);
  }
}

bool MFS_CAT(nonfinite_range_, MFS_CPU_ISA)(
    ElementType dtype, const void* data, int64_t begin, int64_t end) {
  switch (dtype) {
  case ElementType::bfloat16:
    return nonfinite_typed<mx::bfloat16_t>(data, begin, end);
  case ElementType::float16:
    return nonfinite_typed<mx::float16_t>(data, begin, end);
  default:
    return nonfinite_typed<float>(data, begin, end);
  }
}

const Loops MFS_CAT(loops_, MFS_CPU_ISA) = {
    MFS_CAT(update_range_, MFS_CPU_ISA),
    MFS_CAT(sq_sum_range_, MFS_CPU_ISA),
    MFS_CAT(nonfinite_range_, MFS_CPU_ISA),
    MFS_STR(MFS_CPU_ISA)};

#ifdef MFS_CPU_ISA_GENERIC

namespace {

const Loops& select() {
  const char* want = std::getenv("MLX_FUSED_SGD_CPU_ISA");
  auto asked = [&](const char* name) {
    return want == nullptr || std::strcmp(want, name) == 0;
  };
#ifdef MFS_X86_KERNELS
  __builtin_cpu_init();
  // __builtin_cpu_supports also checks that the OS saves the wide registers.
  if (asked("avx512") && __builtin_cpu_supports("avx512f")) {
    return loops_avx512;
  }
  if ((asked("avx2") || (want && std::strcmp(want, "avx512") == 0)) &&
      __builtin_cpu_supports("avx2")) {
    return loops_avx2;
  }
#endif
  return loops_generic;
}

} // namespace

namespace {

// Copies n elements (a no-op in place).
template <typename X> void copy_run(const X* in, X* out, int64_t n) {
  if (in != nullptr && in != out) {
    std::memcpy(out, in, n * sizeof(X));
  }
}

// copy_range on the raw element types (P: the param's, S: the momentum
// buffer's).
template <typename P, typename S>
void copy_typed(const TensorPointers& t, int64_t begin, int64_t end) {
  auto copy_row = [](const RowPointers<P, S>& row, int64_t n, int64_t) {
    copy_run(row.p, row.p_out, n);
    copy_run(row.v, row.v_out, n);
    copy_run(row.m, row.m_out, n);
  };
  if (t.contiguous) {
    copy_row(contiguous_row<P, S>(t, begin), end - begin, begin);
  } else {
    walk_strided<P, S>(t, begin, end, false, copy_row);
  }
}

} // namespace

void copy_range(
    const KernelKey& key, const TensorPointers& t, int64_t begin, int64_t end) {
  const bool half = key.dtype != ElementType::float32;
  const bool half_state = key.state_dtype != ElementType::float32;
  if (half) {
    return half_state ? copy_typed<uint16_t, uint16_t>(t, begin, end)
                      : copy_typed<uint16_t, uint32_t>(t, begin, end);
  }
  return copy_typed<uint32_t, uint32_t>(t, begin, end);
}

StridedWalk plan_walk(launch::StridedLayout layout_in) {
  StridedWalk w;
  w.layout = std::move(layout_in);
  const auto& layout = w.layout;
  // Absent operands carry the outputs' strides, never transposed.
  bool transposed = false;
  for (int op = 0; op < launch::kLayoutOut; ++op) {
    transposed = transposed || layout.transposed(op);
  }
  // At least 1: an empty tensor has an axis of size 0 (and no tiles).
  w.tile_rows =
      std::max<int64_t>(1, transposed ? std::min(kTileRows, layout.rows()) : 1);
  w.tile_cols = std::max<int64_t>(
      1,
      std::min(layout.cols(), transposed ? kTileBudget / kTileRows : kRowTile));
  w.tile_ld = w.tile_rows > 1 ? w.tile_cols + kTilePad : w.tile_cols;
  w.row_tiles = (layout.rows() + w.tile_rows - 1) / w.tile_rows;
  w.col_tiles = (layout.cols() + w.tile_cols - 1) / w.tile_cols;
  w.units = layout.outer_size() * w.row_tiles * w.col_tiles;
  return w;
}

const Loops& selected_loops() {
  static const Loops& loops = select();
  return loops;
}

UpdateRange select_update_range() {
  return selected_loops().update;
}

const char* selected_isa() {
  return selected_loops().isa;
}

#endif

} // namespace cpu_kernel
} // namespace mlx_fused_sgd
