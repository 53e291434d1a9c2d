// SGDUpdate on the CPU: the per-instruction-set loops of
// cpu/sgd_cpu_kernel.cpp over a chunk, split across threads.
#include <algorithm>

#include "mlx/backend/cpu/encoder.h"

#include "common/sgd_update.h"
#include "cpu/sgd_cpu_kernel.h"
#include "cpu/thread_pool.h"
#include "kernels/sgd_element.h"
#include "sgd_update.h"
#include "utils.h"

namespace mlx_fused_sgd {

namespace {

// The smallest chunk worth splitting across threads (below it, waking the
// workers costs more than it saves).
constexpr int64_t kMinParallelElements = 1 << 17;

// Updates every tensor of a chunk with the loop of the best instruction set
// this CPU has. A large chunk is cut into one equal share of elements per
// thread (shares may span tensors): the threads stream at the same rate, so
// equal shares finish together, where fixed-size items left one thread idle
// for up to an item at the end of every chunk.
void sgd_chunk(
    const std::vector<cpu_kernel::TensorPointers>& tensors,
    const cpu_kernel::KernelKey& key,
    math::StepScalars scalars,
    math::SGDHyper h,
    bool skip) {
  static const auto best_update_range = cpu_kernel::select_update_range();
  // A skipped step (a non-finite gradient) keeps params and momentum.
  auto update_range = [&](const cpu_kernel::KernelKey& k,
                          const cpu_kernel::TensorPointers& t,
                          int64_t begin,
                          int64_t end) {
    if (skip) {
      cpu_kernel::copy_range(k, t, begin, end);
    } else {
      best_update_range(k, t, begin, end, scalars, h);
    }
  };
  int64_t total = 0;
  for (const auto& t : tensors) {
    total += t.size;
  }
  auto& pool = ThreadPool::instance();
  const int64_t shares = pool.num_threads();
  if (total < kMinParallelElements || shares == 1) {
    for (const auto& t : tensors) {
      update_range(key, t, 0, t.size);
    }
    return;
  }
  pool.parallel_for(shares, [&](int64_t k) {
    // Share k is elements [begin, end) of the chunk's tensors laid end to end.
    const int64_t begin = total * k / shares;
    const int64_t end = total * (k + 1) / shares;
    int64_t offset = 0;
    for (const auto& t : tensors) {
      const int64_t lo = std::max(begin - offset, int64_t(0));
      const int64_t hi = std::min(end - offset, t.size);
      if (lo < hi) {
        update_range(key, t, lo, hi);
      }
      offset += t.size;
      if (offset >= end) {
        break;
      }
    }
  });
}

} // namespace

void SGDUpdate::eval_cpu(
    const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) {
  check_layout(inputs, outputs);
  release_sibling_inputs(inputs, outputs);
  const int n = num_tensors_;
  const bool momentum = variant_.momentum;
  const bool master = master_weights();
  auto& encoder = mx::cpu::get_command_encoder(stream());

  std::vector<cpu_kernel::TensorPointers> tensors;
  tensors.reserve(n);
  for (int i = 0; i < n; ++i) {
    const auto slots = tensor_slots(inputs, outputs, n, i, momentum, master);
    prepare_tensor(encoder, slots);
    auto [p, g, v, p_out, v_out, m, m_out] = slots;
    bool contiguous = all_row_contiguous(p, g, v, m);
    cpu_kernel::TensorPointers t{
        p.data<void>(),
        g.data<void>(),
        momentum ? v->data<void>() : nullptr,
        p_out.data<void>(),
        momentum ? v_out->data<void>() : nullptr,
        static_cast<int64_t>(p.size()),
        contiguous};
    if (master) {
      t.master = m->data<float>();
      t.master_out = m_out->data<float>();
    }
    t.rounding_tensor = tensor_id(i);
    if (!contiguous) {
      t.walk = cpu_kernel::plan_walk(strided_layout(p, g, v, m));
    }
    tensors.push_back(std::move(t));
  }

  const auto& lr_input = inputs[lr_index()];
  encoder.set_input_array(lr_input);
  const void* lr_ptr = lr_input.data<void>();
  // The optional scalar inputs, read when the task runs.
  auto scalar_ptr = [&]<typename T>(bool present, size_t index) {
    if (!present) {
      return static_cast<const T*>(nullptr);
    }
    encoder.set_input_array(inputs[index]);
    return inputs[index].data<T>();
  };
  const float* scale_ptr = scalar_ptr.template operator()<float>(
      variant_.scale_grad(), scale_index());
  const uint32_t* skip_ptr =
      scalar_ptr.template operator()<uint32_t>(variant_.skip, skip_index());
  const float* clip_ptr =
      scalar_ptr.template operator()<float>(variant_.clip, clip_index());
  const uint64_t* rounding_step_ptr = scalar_ptr.template operator()<uint64_t>(
      stochastic_rounding(), rounding_step_index());
  const cpu_kernel::KernelKey key{
      element_type(inputs[0].dtype()),
      element_type(
          momentum ? inputs[2 * n].dtype() : inputs[0].dtype()),
      variant_.momentum,
      variant_.rounding};
  // The launch constants the GPU kernels take: the CPU reads its step's
  // scalars with the same code (element::launch_step_scalars).
  const auto args = launch::sgd_args(variant_, fused_schedule(), 0);
  encoder.dispatch([tensors = std::move(tensors),
                    key,
                    lr_ptr,
                    scale_ptr,
                    skip_ptr,
                    clip_ptr,
                    rounding_step_ptr,
                    args]() mutable {
    // The learning rate (or step counter), the loss scale, the clip factor
    // and the rounding step are read when the task runs, after the ops that
    // produce them have run.
    const math::StepScalars scalars = element::launch_step_scalars(
        static_cast<const float*>(lr_ptr),
        static_cast<const uint64_t*>(lr_ptr),
        scale_ptr,
        clip_ptr,
        args);
    if (rounding_step_ptr != nullptr) {
      for (auto& t : tensors) {
        t.rounding_stream = math::rounding_stream(
            args.rounding_seed, *rounding_step_ptr, t.rounding_tensor);
      }
    }
    sgd_chunk(
        tensors,
        key,
        scalars,
        args.hyper,
        skip_ptr != nullptr && *skip_ptr != 0);
  });
}

} // namespace mlx_fused_sgd
