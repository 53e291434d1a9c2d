// What eval_cpu and eval_gpu of SGDUpdate share: the output buffers
// (donation) and the tensor slots and layouts of a chunk.
#pragma once

#include <vector>

#include "mlx/array.h"

#include "kernels/sgd_plan.h"

namespace mlx_fused_sgd {

namespace mx = mlx::core;

// The arrays of tensor i of a chunk of n, in the primitive's layout: inputs
// params[n], grads[n], velocities[n] (momentum only), masters[n] (master
// weights only), scalars; outputs params[n], velocities[n] (momentum only),
// masters[n] (master weights only).
struct TensorSlots {
  const mx::array& p;
  const mx::array& g;
  const mx::array* v;
  mx::array& p_out;
  mx::array* v_out;
  const mx::array* m;
  mx::array* m_out;
};

TensorSlots tensor_slots(
    const std::vector<mx::array>& inputs,
    std::vector<mx::array>& outputs,
    int n,
    int i,
    bool momentum,
    bool master);

// Gives `out` the buffer of `in` when MLX says nothing else can read `in`
// (in place), with the layout a fresh buffer would have.
bool try_donate(const mx::array& in, mx::array& out);

// The outputs of one tensor: the param's and the momentum buffer's own
// buffers when donatable, else the gradient's, else new ones.
void allocate_outputs(
    const mx::array& p,
    const mx::array& g,
    const mx::array* v,
    mx::array& p_out,
    mx::array* v_out);

// The master copy's output: its own buffer when donatable.
void allocate_master(const mx::array* m, mx::array* m_out);

// Gives tensor `t`'s outputs their buffers (allocate_outputs,
// allocate_master).
inline void allocate_tensor(const TensorSlots& t) {
  allocate_outputs(t.p, t.g, t.v, t.p_out, t.v_out);
  allocate_master(t.m, t.m_out);
}

// allocate_tensor, then registers the tensor's arrays with the CPU's encoder
// (CUDA's takes them launch by launch: cuda::LaunchArrays).
template <typename Encoder>
void prepare_tensor(Encoder& encoder, const TensorSlots& t) {
  allocate_tensor(t);
  encoder.set_input_array(t.p);
  encoder.set_input_array(t.g);
  encoder.set_output_array(t.p_out);
  if (t.v != nullptr) {
    encoder.set_input_array(*t.v);
    encoder.set_output_array(*t.v_out);
  }
  if (t.m != nullptr) {
    encoder.set_input_array(*t.m);
    encoder.set_output_array(*t.m_out);
  }
}

bool all_row_contiguous(
    const mx::array& p,
    const mx::array& g,
    const mx::array* v,
    const mx::array* m);

// The layout the CPU strided loop and the general Metal kernels walk, from
// one tensor's operands (v, m: nullptr when absent).
launch::StridedLayout strided_layout(
    const mx::array& p,
    const mx::array& g,
    const mx::array* v,
    const mx::array* m);

} // namespace mlx_fused_sgd
