// The step-decay learning-rate schedule as an MLX primitive.
#pragma once

#include <cstdint>
#include <stdexcept>

#include "mlx/ops.h"
#include "mlx/primitives.h"

#include "utils.h"

namespace mlx_fused_sgd {

namespace mx = mlx::core;

// The three numbers of a step-decay schedule, as the user gave them.
// `init` and `decay_rate` are rounded once to float32 where they are used,
// exactly as stock mlx.optimizers.step_decay rounds its Python floats.
struct StepDecay {
  double init;
  double decay_rate;
  int64_t step_size;

  // Throws std::invalid_argument naming the bad number.
  void validate() const;
  bool operator==(const StepDecay& other) const = default;
};

// float32 learning rate for every element of the integer array `step`:
//   lr = float32(init) * pow(float32(decay_rate), float32(step // step_size))
// Bit-identical to stock mlx.optimizers.step_decay(init, decay_rate,
// step_size)(step) on the CPU.
mx::array step_decay_lr(
    const mx::array& step,
    double init,
    double decay_rate,
    int64_t step_size,
    mx::StreamOrDevice s = {});

// The same numbers from stock MLX ops: the fallback for devices without a
// kernel of this package (MLX's CUDA backend), also callable on the CPU.
mx::array step_decay_lr_composed(
    const mx::array& step,
    const StepDecay& schedule,
    mx::StreamOrDevice s = {});

// Checks that `step` is an integer array that can hold `step_size` (as stock,
// where `step // step_size` casts step_size to the step's dtype).
void check_step_array(
    const mx::array& step, int64_t step_size, const char* what);

class StepDecayLR : public mx::UnaryPrimitive {
 public:
  StepDecayLR(mx::Stream stream, StepDecay schedule)
      : mx::UnaryPrimitive(stream), schedule_(schedule) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override;
  void eval_gpu(const std::vector<mx::array>& inputs, mx::array& out) override;

  std::pair<std::vector<mx::array>, std::vector<int>> vmap(
      const std::vector<mx::array>& inputs,
      const std::vector<int>& axes) override;

  const char* name() const override {
    return "StepDecayLR";
  }
  bool is_equivalent(const mx::Primitive& other) const override;
  std::vector<mx::Shape>
  output_shapes(const std::vector<mx::array>& inputs) override;

  const StepDecay& schedule() const {
    return schedule_;
  }

 private:
  StepDecay schedule_;
};

// Calls f(I{}) with I the C++ integer type of `dtype` (the op's checks and
// eval_cpu).
template <typename F> void dispatch_integer(mx::Dtype dtype, F&& f) {
  switch (dtype) {
  case mx::int8:
    return f(int8_t{});
  case mx::int16:
    return f(int16_t{});
  case mx::int32:
    return f(int32_t{});
  case mx::int64:
    return f(int64_t{});
  case mx::uint8:
    return f(uint8_t{});
  case mx::uint16:
    return f(uint16_t{});
  case mx::uint32:
    return f(uint32_t{});
  case mx::uint64:
    return f(uint64_t{});
  default:
    throw std::invalid_argument(
        "step must be an integer array, got dtype " + dtype_name(dtype) + ".");
  }
}

} // namespace mlx_fused_sgd
