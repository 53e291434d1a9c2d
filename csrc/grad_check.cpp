#include "grad_check.h"

#include <algorithm>
#include <atomic>
#include <stdexcept>

#include "mlx/backend/cpu/encoder.h"
#ifdef _METAL_
#include "mlx/backend/metal/device.h"
#endif

#include "kernels/sgd_launch.h"
#include "sgd_cpu_kernel.h"
#include "thread_pool.h"
#include "utils.h"

namespace mlx_fused_sgd {

namespace {

// Stock ops with the same answer, for devices without a kernel of ours.
mx::array
nonfinite_composed(const std::vector<mx::array>& grads, mx::StreamOrDevice s) {
  std::vector<mx::array> flags;
  flags.reserve(grads.size());
  for (const auto& g : grads) {
    flags.push_back(mx::any(mx::logical_not(mx::isfinite(g, s), s), s));
  }
  return mx::any(mx::stack(flags, s), s);
}

mx::array
sq_norm_composed(const std::vector<mx::array>& grads, mx::StreamOrDevice s) {
  mx::array total = mx::array(0.0f);
  for (const auto& g : grads) {
    total = mx::add(
        total, mx::sum(mx::square(mx::astype(g, mx::float32, s), s), s), s);
  }
  return total;
}

// Whether a gradient can be read as one block of memory in storage order:
// row-contiguous, or any other order of a dense block (a transposed view,
// as nn.value_and_grad returns every nn.Linear weight's gradient) with
// non-negative strides, so that its data pointer is the block's start. The
// check and the sum of squares do not depend on the order.
bool reads_as_block(const mx::array& g) {
  if (g.flags().row_contiguous) {
    return true;
  }
  if (!g.flags().contiguous || g.data_size() != g.size()) {
    return false;
  }
  for (auto s : g.strides()) {
    if (s < 0) {
      return false;
    }
  }
  return true;
}

// One tensor of a chunk, as the CPU loop sees it.
struct CheckView {
  const void* data;
  int64_t size;
  bool contiguous;
  mx::Dtype dtype;
  mx::Shape shape;
  mx::Strides strides;
};

// Other strided tensors (sliced, broadcast; rare): one element at a time,
// one sum.
template <typename T>
bool strided_nonfinite(const CheckView& v, int64_t begin, int64_t end) {
  auto x = static_cast<const T*>(v.data);
  int bad = 0;
  for (int64_t i = begin; i < end; ++i) {
    bad |= math::is_nonfinite(
        static_cast<float>(x[elem_to_loc(i, v.shape, v.strides)]));
  }
  return bad != 0;
}

template <typename T>
double strided_sq_sum(const CheckView& v, int64_t begin, int64_t end) {
  auto x = static_cast<const T*>(v.data);
  double sum = 0.0;
  for (int64_t i = begin; i < end; ++i) {
    double e = static_cast<float>(x[elem_to_loc(i, v.shape, v.strides)]);
    sum += e * e;
  }
  return sum;
}

// Contiguous tensors take the loops compiled for this CPU's widest
// instruction set (csrc/sgd_cpu_kernel.cpp), as the update does.
double view_sq_sum(const CheckView& v, int64_t begin, int64_t end) {
  if (v.contiguous) {
    static const auto sq_sum = cpu_kernel::selected_loops().sq_sum;
    return sq_sum(cpu_kernel::dtype_code(v.dtype), v.data, begin, end);
  }
  switch (v.dtype) {
  case mx::float16:
    return strided_sq_sum<mx::float16_t>(v, begin, end);
  case mx::bfloat16:
    return strided_sq_sum<mx::bfloat16_t>(v, begin, end);
  default:
    return strided_sq_sum<float>(v, begin, end);
  }
}

bool view_nonfinite(const CheckView& v, int64_t begin, int64_t end) {
  if (v.contiguous) {
    static const auto nonfinite = cpu_kernel::selected_loops().nonfinite;
    return nonfinite(cpu_kernel::dtype_code(v.dtype), v.data, begin, end);
  }
  switch (v.dtype) {
  case mx::float16:
    return strided_nonfinite<mx::float16_t>(v, begin, end);
  case mx::bfloat16:
    return strided_nonfinite<mx::bfloat16_t>(v, begin, end);
  default:
    return strided_nonfinite<float>(v, begin, end);
  }
}

// The smallest chunk worth splitting across threads.
constexpr int64_t kMinParallelElements = 1 << 18;

bool chunk_nonfinite(const std::vector<CheckView>& views) {
  int64_t total = 0;
  for (const auto& v : views) {
    total += v.size;
  }
  auto& pool = ThreadPool::instance();
  const int64_t shares = pool.num_threads();
  if (total < kMinParallelElements || shares == 1) {
    for (const auto& v : views) {
      if (view_nonfinite(v, 0, v.size)) {
        return true;
      }
    }
    return false;
  }
  // One equal share of the elements per thread, as the update splits them.
  std::atomic<bool> bad{false};
  pool.parallel_for(shares, [&](int64_t k) {
    const int64_t begin = total * k / shares;
    const int64_t end = total * (k + 1) / shares;
    int64_t offset = 0;
    for (const auto& v : views) {
      const int64_t lo = std::max(begin - offset, int64_t(0));
      const int64_t hi = std::min(end - offset, v.size);
      if (lo < hi && view_nonfinite(v, lo, hi)) {
        bad.store(true, std::memory_order_relaxed);
        return;
      }
      offset += v.size;
      if (offset >= end) {
        return;
      }
    }
  });
  return bad.load();
}

// Sum of squares of a chunk: per tensor in double (shares of the elements
// across threads, combined in order), rounded to float32, then the tensors
// added in order in float32.
float chunk_sq_norm(const std::vector<CheckView>& views) {
  const int64_t n = static_cast<int64_t>(views.size());
  int64_t total = 0;
  for (const auto& v : views) {
    total += v.size;
  }
  auto& pool = ThreadPool::instance();
  const int64_t shares =
      (total < kMinParallelElements) ? 1 : pool.num_threads();
  std::vector<double> partial(shares * n, 0.0);
  auto run_share = [&](int64_t k) {
    const int64_t begin = total * k / shares;
    const int64_t end = total * (k + 1) / shares;
    int64_t offset = 0;
    for (int64_t t = 0; t < n; ++t) {
      const auto& v = views[t];
      const int64_t lo = std::max(begin - offset, int64_t(0));
      const int64_t hi = std::min(end - offset, v.size);
      if (lo < hi) {
        partial[k * n + t] = view_sq_sum(v, lo, hi);
      }
      offset += v.size;
      if (offset >= end) {
        return;
      }
    }
  };
  if (shares == 1) {
    run_share(0);
  } else {
    pool.parallel_for(shares, run_share);
  }
  float sum = 0.0f;
  for (int64_t t = 0; t < n; ++t) {
    double tensor_sum = 0.0;
    for (int64_t k = 0; k < shares; ++k) {
      tensor_sum += partial[k * n + t];
    }
    sum = sum + static_cast<float>(tensor_sum);
  }
  return sum;
}

void check_grads(
    const std::vector<mx::array>& grads,
    int tensors_per_primitive,
    const char* what) {
  if (tensors_per_primitive < 1) {
    throw std::invalid_argument(
        "tensors_per_primitive must be >= 1, but got " +
        std::to_string(tensors_per_primitive) + ".");
  }
  for (size_t i = 0; i < grads.size(); ++i) {
    auto d = grads[i].dtype();
    if (d != mx::float32 && d != mx::float16 && d != mx::bfloat16) {
      throw std::invalid_argument(
          "grads[" + std::to_string(i) + "] has dtype " + dtype_name(d) +
          "; the " + what + " supports float32, float16 and bfloat16.");
    }
  }
}

// One GradCheck primitive of `kind` per chunk of tensors; its scalar outputs.
std::vector<mx::array> grad_chunks(
    const std::vector<mx::array>& grads,
    int tensors_per_primitive,
    const mx::Stream& stream,
    GradCheck::Kind kind) {
  std::vector<mx::array> outs;
  for (size_t start = 0; start < grads.size(); start += tensors_per_primitive) {
    size_t end = std::min(grads.size(), start + tensors_per_primitive);
    std::vector<mx::array> chunk(grads.begin() + start, grads.begin() + end);
    outs.push_back(
        mx::array(
            mx::Shape{},
            kind == GradCheck::Kind::nonfinite ? mx::uint32 : mx::float32,
            std::make_shared<GradCheck>(
                stream, static_cast<int>(chunk.size()), kind),
            std::move(chunk)));
  }
  return outs;
}

} // namespace

mx::array grads_sq_norm(
    const std::vector<mx::array>& grads,
    int tensors_per_primitive,
    mx::StreamOrDevice s,
    bool use_fallback) {
  check_grads(grads, tensors_per_primitive, "gradient norm");
  auto stream = mx::to_stream(s);
  if (use_fallback || !has_fused_kernel(stream)) {
    return sq_norm_composed(grads, stream);
  }
  auto sums = grad_chunks(
      grads, tensors_per_primitive, stream, GradCheck::Kind::sq_norm);
  mx::array total = mx::array(0.0f);
  for (size_t i = 0; i < sums.size(); ++i) {
    total = i == 0 ? sums[0] : mx::add(total, sums[i], stream);
  }
  return total;
}

mx::array grads_nonfinite(
    const std::vector<mx::array>& grads,
    int tensors_per_primitive,
    mx::StreamOrDevice s,
    bool use_fallback) {
  check_grads(grads, tensors_per_primitive, "non-finite check");
  if (grads.empty()) {
    return mx::array(false);
  }
  auto stream = mx::to_stream(s);
  if (use_fallback || !has_fused_kernel(stream)) {
    return nonfinite_composed(grads, stream);
  }
  auto flags = grad_chunks(
      grads, tensors_per_primitive, stream, GradCheck::Kind::nonfinite);
  if (flags.size() == 1) {
    return mx::astype(flags[0], mx::bool_, stream);
  }
  return mx::any(mx::stack(flags, stream), stream);
}

void GradCheck::eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) {
  allocate(out);
  auto& encoder = mx::cpu::get_command_encoder(stream());
  std::vector<CheckView> views;
  views.reserve(inputs.size());
  for (const auto& g : inputs) {
    encoder.set_input_array(g);
    CheckView v{
        g.data<void>(),
        static_cast<int64_t>(g.size()),
        reads_as_block(g),
        g.dtype(),
        {},
        {}};
    if (!v.contiguous) {
      v.shape = g.shape();
      v.strides = g.strides();
    }
    views.push_back(std::move(v));
  }
  encoder.set_output_array(out);
  if (kind_ == Kind::nonfinite) {
    encoder.dispatch([views = std::move(views), flag = out.data<uint32_t>()]() {
      *flag = chunk_nonfinite(views) ? 1u : 0u;
    });
  } else {
    encoder.dispatch([views = std::move(views), sum = out.data<float>()]() {
      *sum = chunk_sq_norm(views);
    });
  }
}

#if MFS_METAL_KERNELS

void GradCheck::eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) {
  allocate(out);
  auto& s = stream();
  auto& d = mx::metal::device(s.device);
  auto* lib = d.get_library(kMetalLibraryName, extension_dir());
  auto& encoder = mx::metal::get_command_encoder(s);

  const auto read = kind_ == Kind::nonfinite ? launch::GradRead::check
                                             : launch::GradRead::norm;
  auto* clear = d.get_kernel(launch::grad_read_clear_name(read), lib);
  encoder.set_compute_pipeline_state(clear);
  encoder.set_output_array(out, launch::kCheckFlag);
  encoder.dispatch_threads(MTL::Size(1, 1, 1), MTL::Size(1, 1, 1));

  for (const auto& g : inputs) {
    if (g.size() == 0) {
      continue;
    }
    const bool contiguous = reads_as_block(g);
    auto plan = launch::plan_grad_read(
        read,
        dtype_name(g.dtype()),
        contiguous,
        static_cast<int64_t>(g.size()),
        g.ndim());
    auto* kernel = d.get_kernel(plan.name, lib);
    encoder.set_compute_pipeline_state(kernel);
    encoder.set_input_array(g, launch::kCheckIn);
    encoder.set_output_array(out, launch::kCheckFlag);
    encoder.set_bytes(plan.args, launch::kCheckArgs);
    if (!contiguous) {
      encoder.set_vector_bytes(g.shape(), launch::kCheckShape);
      encoder.set_vector_bytes(g.strides(), launch::kCheckStrides);
    }
    // Threadgroups of whole SIMD groups, at most kMaxSimdGroups (the
    // kernels' threadgroup reduction has a slot per SIMD group).
    const uint64_t group_limit =
        std::min<uint64_t>(
            kernel->maxTotalThreadsPerThreadgroup() / launch::kSimdWidth,
            launch::kMaxSimdGroups) *
        launch::kSimdWidth;
    auto grid = launch::make_grid(plan.threads, group_limit);
    encoder.dispatch_threads(
        MTL::Size(grid.x, grid.y, 1), MTL::Size(grid.group, 1, 1));
  }
}

#else

void GradCheck::eval_gpu(const std::vector<mx::array>&, mx::array&) {
  // grads_nonfinite composes stock ops on a GPU stream in builds without
  // Metal kernels, so only a hand-built graph reaches this.
  throw std::runtime_error(
      "mlx_fused_sgd: GradCheck has no GPU kernel in this build (no Metal "
      "kernels); use grads_nonfinite, which falls back to stock MLX ops.");
}

#endif

std::vector<mx::array> GradCheck::jvp(
    const std::vector<mx::array>&,
    const std::vector<mx::array>&,
    const std::vector<int>&) {
  throw std::runtime_error(
      "mlx_fused_sgd: GradCheck (a non-finite test) cannot be differentiated.");
}

std::vector<mx::array> GradCheck::vjp(
    const std::vector<mx::array>&,
    const std::vector<mx::array>&,
    const std::vector<int>&,
    const std::vector<mx::array>&) {
  throw std::runtime_error(
      "mlx_fused_sgd: GradCheck (a non-finite test) cannot be differentiated.");
}

std::pair<std::vector<mx::array>, std::vector<int>>
GradCheck::vmap(const std::vector<mx::array>&, const std::vector<int>&) {
  throw std::runtime_error(
      "mlx_fused_sgd: GradCheck does not support vmap; check the batched "
      "gradients directly.");
}

bool GradCheck::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const GradCheck&>(other);
  return num_tensors_ == o.num_tensors_ && kind_ == o.kind_;
}

std::vector<mx::Shape> GradCheck::output_shapes(const std::vector<mx::array>&) {
  return {mx::Shape{}};
}

} // namespace mlx_fused_sgd
