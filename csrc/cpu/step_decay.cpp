// StepDecayLR on the CPU.
#include "mlx/backend/cpu/encoder.h"

#include "kernels/sgd_math.h"
#include "step_decay.h"
#include "utils.h"

namespace mlx_fused_sgd {

void StepDecayLR::eval_cpu(
    const std::vector<mx::array>& inputs, mx::array& out) {
  const auto& step = inputs[0];
  allocate(out);

  auto& encoder = mx::cpu::get_command_encoder(stream());
  encoder.set_input_array(step);
  encoder.set_output_array(out);

  const float init = static_cast<float>(schedule_.init);
  const float decay_rate = static_cast<float>(schedule_.decay_rate);
  dispatch_integer(step.dtype(), [&](auto zero) {
    using I = decltype(zero);
    encoder.dispatch([step_ptr = step.data<I>(),
                      out_ptr = out.data<float>(),
                      size = static_cast<int64_t>(out.size()),
                      contiguous = step.flags().row_contiguous,
                      shape = step.shape(),
                      strides = step.strides(),
                      step_size = static_cast<I>(schedule_.step_size),
                      init,
                      decay_rate]() {
      for (int64_t i = 0; i < size; ++i) {
        int64_t loc = contiguous ? i : elem_to_loc(i, shape, strides);
        out_ptr[i] =
            math::step_decay_lr<I>(step_ptr[loc], step_size, init, decay_rate);
      }
    });
  });
}

} // namespace mlx_fused_sgd
