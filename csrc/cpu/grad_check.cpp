// GradCheck on the CPU: the non-finite check and the sum of squares, with
// the update's per-instruction-set loops for contiguous gradients.
#include <algorithm>
#include <atomic>

#include "mlx/backend/cpu/encoder.h"

#include "cpu/sgd_cpu_kernel.h"
#include "cpu/thread_pool.h"
#include "grad_check.h"
#include "utils.h"

namespace mlx_fused_sgd {

namespace {

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
// instruction set (csrc/cpu/sgd_cpu_kernel.cpp), as the update does.
double view_sq_sum(const CheckView& v, int64_t begin, int64_t end) {
  if (v.contiguous) {
    static const auto sq_sum = cpu_kernel::selected_loops().sq_sum;
    return sq_sum(element_type(v.dtype), v.data, begin, end);
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
    return nonfinite(element_type(v.dtype), v.data, begin, end);
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

} // namespace

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

} // namespace mlx_fused_sgd
