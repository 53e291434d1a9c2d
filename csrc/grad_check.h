// Reads of the gradients before the update, as one MLX primitive each chunk:
// the non-finite check of skip_nonfinite (a uint32 flag, 1: some NaN or Inf)
// and the squared L2 norm of max_grad_norm (a float32). Both stay on the
// device, read there by the update: no host round trip.
#pragma once

#include <vector>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mlx_fused_sgd {

namespace mx = mlx::core;

// A single-output primitive costs O(inputs) to build, unlike the update's
// multi-output chunks, so one primitive can check many tensors (one pass and
// one fork-join over the thread pool).
inline constexpr int kDefaultTensorsPerCheck = 1024;

// A boolean scalar, true when any element of any of `grads` is NaN or Inf.
// Float32, float16 and bfloat16 arrays, checked `tensors_per_primitive` to a
// primitive; composed of stock ops on a device without a kernel of ours.
mx::array grads_nonfinite(
    const std::vector<mx::array>& grads,
    int tensors_per_primitive = kDefaultTensorsPerCheck,
    mx::StreamOrDevice s = {},
    bool use_fallback = false);

// The squared L2 norm of all of `grads` together, a float32 scalar on the
// device: per tensor summed in double precision and rounded to float32, the
// tensors then added in order in float32 (as stock clip_grad_norm adds its
// per-tensor sums). On Metal the float32 partial sums are added atomically,
// in an order that varies from run to run.
mx::array grads_sq_norm(
    const std::vector<mx::array>& grads,
    int tensors_per_primitive = kDefaultTensorsPerCheck,
    mx::StreamOrDevice s = {},
    bool use_fallback = false);

class GradCheck : public mx::UnaryPrimitive {
 public:
  enum class Kind { nonfinite, sq_norm };

  GradCheck(mx::Stream stream, int num_tensors, Kind kind)
      : mx::UnaryPrimitive(stream), num_tensors_(num_tensors), kind_(kind) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;


  const char* name() const override {
    return kind_ == Kind::nonfinite ? "GradCheck" : "GradNorm";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape>
  output_shapes(const std::vector<mx::array>& inputs) override;

 private:
  int num_tensors_;
  Kind kind_;
};

// Whether a gradient can be read as one block of memory in storage order
// (eval_cpu and eval_gpu read such gradients linearly).
bool reads_as_block(const mx::array& g);

// The GPU norm's slots: a float32 buffer of `count` slots (at least one: no
// empty buffer is allocated), one for each threadgroup (Metal) or block
// (CUDA) of the reads, which writes its own, so it is not cleared. `gpu`
// names the backend in the error for a count past a grid's reach.
mx::array allocate_norm_slots(int64_t count, const char* gpu);

} // namespace mlx_fused_sgd
