#include "grad_check.h"

#include <algorithm>
#include <stdexcept>
#include <string>

#include "mlx/allocator.h"

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
    outs.push_back(mx::array(
        mx::Shape{},
        kind == GradCheck::Kind::nonfinite ? mx::uint32 : mx::float32,
        std::make_shared<GradCheck>(
            stream, static_cast<int>(chunk.size()), kind),
        std::move(chunk)));
  }
  return outs;
}

} // namespace

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

mx::array allocate_norm_slots(int64_t count, const char* gpu) {
  if (count >= (int64_t(1) << 31)) {
    throw std::runtime_error(
        std::string("mlx_fused_sgd: a gradient norm over ") +
        std::to_string(count) + " partial sums on " + gpu +
        "; split the gradients into smaller chunks.");
  }
  mx::array slots(
      {static_cast<int>(std::max<int64_t>(count, 1))},
      mx::float32,
      nullptr,
      {});
  slots.set_data(mx::allocator::malloc(slots.nbytes()));
  return slots;
}

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

bool GradCheck::is_equivalent(const mx::Primitive& other) const {
  const auto& o = static_cast<const GradCheck&>(other);
  return num_tensors_ == o.num_tensors_ && kind_ == o.kind_;
}

std::vector<mx::Shape> GradCheck::output_shapes(const std::vector<mx::array>&) {
  return {mx::Shape{}};
}

} // namespace mlx_fused_sgd
