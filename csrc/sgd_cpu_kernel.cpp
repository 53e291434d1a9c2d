// The CPU loops of the fused SGD update, compiled once per instruction set:
// CMake builds this file with MFS_CPU_ISA=generic (no flags), and on x86-64
// again with MFS_CPU_ISA=avx2 (-mavx2) and MFS_CPU_ISA=avx512 (-mavx512f).
// Everything here has internal linkage or is always inlined, so no copy
// compiled for a wider instruction set can stand in for the generic one.
#include "sgd_cpu_kernel.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#ifdef MFS_CPU_ISA_GENERIC
#include "utils.h"
#endif

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

// Where an updated param goes (R: the rounding mode). Master weights: the
// float32 value to the master copy, its rounding to the param; stochastic
// rounding: bfloat16 rounded with element io's random bits.
template <typename T, int R>
MFS_LOOP_INLINE void
store_param(const TensorPointers& t, T* p_out, int64_t io, float value) {
  if (R == math::kMasterWeights) {
    t.master_out[io] = value;
  }
  if (R == math::kRoundStochastic) {
    value = math::round_bf16_stochastic(
        value, math::rounding_bits(t.rounding_stream, uint64_t(io)));
  }
  store(p_out, io, value);
}

template <
    typename T,
    typename V,
    bool WD,
    bool M,
    bool D,
    bool N,
    bool S,
    int R>
MFS_LOOP_INLINE void sgd_one(
    const TensorPointers& t,
    int64_t ip,
    int64_t ig,
    int64_t iv,
    int64_t im,
    int64_t io,
    float lr,
    math::SGDHyper h) {
  auto g = static_cast<const T*>(t.grad);
  auto v = static_cast<const V*>(t.velocity);
  float pi = R == math::kMasterWeights
                 ? t.master[im]
                 : load(static_cast<const T*>(t.param), ip);
  float vi = M ? load(v, iv) : 0.0f;
  auto r = math::sgd_update_element<WD, M, D, N, S>(pi, load(g, ig), vi, lr, h);
  store_param<T, R>(t, static_cast<T*>(t.param_out), io, r.param);
  if (M) {
    store(static_cast<V*>(t.velocity_out), io, r.velocity);
  }
}

// Contiguous loop over elements [begin, end). Outputs may share a buffer
// with an input (donation), always the whole buffer at the same offset, so
// every element is read before it is written and no element is read after
// another one is written: safe to vectorize, which the pragma tells the
// compiler (it cannot prove it, and would otherwise check for overlap at run
// time and take a scalar loop for the in-place case).
template <
    typename T,
    typename V,
    bool WD,
    bool M,
    bool D,
    bool N,
    bool S,
    int R>
void sgd_contiguous(
    const TensorPointers& t,
    int64_t begin,
    int64_t end,
    float lr,
    math::SGDHyper h) {
  auto p = static_cast<const T*>(t.param);
  auto g = static_cast<const T*>(t.grad);
  auto v = static_cast<const V*>(t.velocity);
  auto p_out = static_cast<T*>(t.param_out);
  auto v_out = static_cast<V*>(t.velocity_out);
  const float* master = t.master;
  float* master_out = t.master_out;
  const uint64_t stream = t.rounding_stream;
  MFS_IVDEP
  for (int64_t i = begin; i < end; ++i) {
    float pi = R == math::kMasterWeights ? master[i] : load(p, i);
    float vi = M ? load(v, i) : 0.0f;
    auto r =
        math::sgd_update_element<WD, M, D, N, S>(pi, load(g, i), vi, lr, h);
    if (R == math::kMasterWeights) {
      master_out[i] = r.param;
    }
    if (R == math::kRoundStochastic) {
      r.param = math::round_bf16_stochastic(
          r.param, math::rounding_bits(stream, uint64_t(i)));
    }
    store(p_out, i, r.param);
    if (M) {
      store(v_out, i, r.velocity);
    }
  }
}

// Updates elements [begin, end) of one tensor.
template <
    typename T,
    typename V,
    bool WD,
    bool M,
    bool D,
    bool N,
    bool S,
    int R>
void sgd_tensor_range(
    const TensorPointers& t,
    int64_t begin,
    int64_t end,
    float lr,
    math::SGDHyper h) {
  if (t.contiguous) {
    sgd_contiguous<T, V, WD, M, D, N, S, R>(t, begin, end, lr, h);
    return;
  }
#ifdef MFS_CPU_ISA_GENERIC
  for (int64_t i = begin; i < end; ++i) {
    int64_t ip = elem_to_loc(i, t.shape, t.param_strides);
    int64_t ig = elem_to_loc(i, t.shape, t.grad_strides);
    int64_t iv = M ? elem_to_loc(i, t.shape, t.velocity_strides) : 0;
    int64_t im = R == math::kMasterWeights
                     ? elem_to_loc(i, t.shape, t.master_strides)
                     : 0;
    sgd_one<T, V, WD, M, D, N, S, R>(t, ip, ig, iv, im, i, lr, h);
  }
#endif
}

template <typename T, typename V, int R>
void update_typed(
    const KernelKey& key,
    const TensorPointers& t,
    int64_t begin,
    int64_t end,
    float lr,
    math::SGDHyper h) {
  auto run = [&]<bool WD, bool S>() {
    if (!key.momentum) {
      return sgd_tensor_range<T, V, WD, false, false, false, S, R>(
          t, begin, end, lr, h);
    }
    if (key.nesterov) {
      return key.dampening
                 ? sgd_tensor_range<T, V, WD, true, true, true, S, R>(
                       t, begin, end, lr, h)
                 : sgd_tensor_range<T, V, WD, true, false, true, S, R>(
                       t, begin, end, lr, h);
    }
    return key.dampening ? sgd_tensor_range<T, V, WD, true, true, false, S, R>(
                               t, begin, end, lr, h)
                         : sgd_tensor_range<T, V, WD, true, false, false, S, R>(
                               t, begin, end, lr, h);
  };
  auto with_wd = [&]<bool S>() {
    return key.weight_decay ? run.template operator()<true, S>()
                            : run.template operator()<false, S>();
  };
  return key.scale_grad ? with_wd.template operator()<true>()
                        : with_wd.template operator()<false>();
}

} // namespace

void MFS_CAT(update_range_, MFS_CPU_ISA)(
    const KernelKey& key,
    const TensorPointers& t,
    int64_t begin,
    int64_t end,
    float lr,
    math::SGDHyper h) {
#ifndef MFS_CPU_ISA_GENERIC
  // Strided tensors take the generic loop: nothing compiled for this
  // instruction set calls a helper shared with other files.
  if (!t.contiguous) {
    return update_range_generic(key, t, begin, end, lr, h);
  }
#endif
  // Half params keep their momentum in their own dtype or in float32, and
  // are stored rounded to nearest, stochastically (bfloat16) or from a
  // float32 master copy.
  auto half_param = [&]<typename T>() {
    auto with_state = [&]<int R>() {
      return key.state_dtype == DtypeCode::float32
                 ? update_typed<T, float, R>(key, t, begin, end, lr, h)
                 : update_typed<T, T, R>(key, t, begin, end, lr, h);
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
  case DtypeCode::float32:
    return update_typed<float, float, math::kRoundNearest>(
        key, t, begin, end, lr, h);
  case DtypeCode::bfloat16:
    return half_param.template operator()<mx::bfloat16_t>();
  case DtypeCode::float16:
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
    DtypeCode dtype, const void* data, int64_t begin, int64_t end) {
  switch (dtype) {
  case DtypeCode::bfloat16:
    return sq_sum_typed<mx::bfloat16_t>(data, begin, end);
  case DtypeCode::float16:
    return sq_sum_typed<mx::float16_t>(data, begin, end);
  default:
    return sq_sum_typed<float>(data, begin, end);
  }
}

bool MFS_CAT(nonfinite_range_, MFS_CPU_ISA)(
    DtypeCode dtype, const void* data, int64_t begin, int64_t end) {
  switch (dtype) {
  case DtypeCode::bfloat16:
    return nonfinite_typed<mx::bfloat16_t>(data, begin, end);
  case DtypeCode::float16:
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

void copy_one(
    const void* src,
    void* dst,
    const TensorPointers& t,
    const mx::Strides& strides,
    int64_t begin,
    int64_t end,
    size_t itemsize) {
  auto in = static_cast<const char*>(src);
  auto out = static_cast<char*>(dst);
  if (t.contiguous) {
    if (in != out) {
      std::memcpy(
          out + begin * itemsize,
          in + begin * itemsize,
          (end - begin) * itemsize);
    }
    return;
  }
  for (int64_t i = begin; i < end; ++i) {
    std::memcpy(
        out + i * itemsize,
        in + elem_to_loc(i, t.shape, strides) * itemsize,
        itemsize);
  }
}

} // namespace

void copy_range(
    const KernelKey& key, const TensorPointers& t, int64_t begin, int64_t end) {
  auto itemsize = [](DtypeCode d) -> size_t {
    return d == DtypeCode::float32 ? 4 : 2;
  };
  copy_one(
      t.param,
      t.param_out,
      t,
      t.param_strides,
      begin,
      end,
      itemsize(key.dtype));
  if (key.momentum) {
    copy_one(
        t.velocity,
        t.velocity_out,
        t,
        t.velocity_strides,
        begin,
        end,
        itemsize(key.state_dtype));
  }
  if (key.rounding == math::kMasterWeights) {
    copy_one(
        t.master, t.master_out, t, t.master_strides, begin, end, sizeof(float));
  }
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
