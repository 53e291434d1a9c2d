// What eval_cpu and eval_gpu of SGDUpdate share: the output buffers
// (donation) and the tensor slots and layouts of a chunk.
#include "common/sgd_update.h"

#include "utils.h"

namespace mlx_fused_sgd {

// Gives `out` the buffer of `in` when MLX says nothing else can read `in`,
// so a steady-state training loop updates in place. The output gets the
// layout a fresh buffer would give it (row-major strides, MLX's flags), not
// the input's: a row-contiguous input may carry other strides on its size-1
// axes (a gradient of a (1, n) weight, say), and a param that inherited
// those would send the next forward pass down another matmul path, with
// other rounding, than the same values in a fresh buffer.
bool try_donate(const mx::array& in, mx::array& out) {
  if (in.is_donatable() && in.flags().row_contiguous &&
      in.dtype() == out.dtype() && in.size() == out.size()) {
    out.copy_shared_buffer(
        in, row_major_strides(out.shape()), fresh_flags(out), out.size());
    return true;
  }
  return false;
}

// Gives the outputs of one tensor their buffers: the param's and the momentum
// buffer's own when donatable (in place), else the gradient's, else new ones.
void allocate_outputs(
    const mx::array& p,
    const mx::array& g,
    const mx::array* v,
    mx::array& p_out,
    mx::array* v_out) {
  bool grad_taken = false;
  if (!try_donate(p, p_out)) {
    grad_taken = try_donate(g, p_out);
    if (!grad_taken) {
      allocate(p_out);
    }
  }
  if (v != nullptr && !try_donate(*v, *v_out) &&
      (grad_taken || !try_donate(g, *v_out))) {
    allocate(*v_out);
  }
}

bool all_row_contiguous(
    const mx::array& p,
    const mx::array& g,
    const mx::array* v,
    const mx::array* m) {
  return p.flags().row_contiguous && g.flags().row_contiguous &&
         (v == nullptr || v->flags().row_contiguous) &&
         (m == nullptr || m->flags().row_contiguous);
}

TensorSlots tensor_slots(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs,
    int n,
    int i,
    bool momentum,
    bool master) {
  const int master_in = (momentum ? 3 : 2) * n;
  const int master_out = (momentum ? 2 : 1) * n;
  return {
      inputs[i],
      inputs[n + i],
      momentum ? &inputs[2 * n + i] : nullptr,
      outputs[i],
      momentum ? &outputs[n + i] : nullptr,
      master ? &inputs[master_in + i] : nullptr,
      master ? &outputs[master_out + i] : nullptr};
}

// The layout the CPU strided loop and the general Metal kernels walk, from
// one tensor's operands (v, m: nullptr when absent).
launch::StridedLayout strided_layout(
    const mx::array& p,
    const mx::array& g,
    const mx::array* v,
    const mx::array* m) {
  return launch::plan_strided(
      p.shape(),
      {&p.strides(),
       &g.strides(),
       v ? &v->strides() : nullptr,
       m ? &m->strides() : nullptr});
}

// The master copy's output: its own buffer when donatable (in place).
void allocate_master(const mx::array* m, mx::array* m_out) {
  if (m != nullptr && !try_donate(*m, *m_out)) {
    allocate(*m_out);
  }
}

} // namespace mlx_fused_sgd
