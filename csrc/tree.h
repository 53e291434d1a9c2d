// The optimizer's per-step tree work (flatten, rebuild, commit) in C++; see
// tree.cpp.
#pragma once

#include <optional>

#include <nanobind/nanobind.h>

namespace mlx_fused_sgd {

namespace nb = nanobind;

// (grads, params, states, entries): the leaves of `grads` in the Python
// walk's order, the params beside them, the per-parameter state dicts
// (`state` None: empty) and each dict's `state_key` entry (None: empty);
// None where the Python walk must run instead.
nb::object collect_tree(
    nb::handle grads,
    nb::handle params,
    nb::handle state,
    std::optional<nb::str> state_key);

// A tree shaped like `grads` holding `leaves` in order; None where the
// Python rebuild must run instead.
nb::object rebuild_tree(nb::handle grads, nb::list leaves);

// states[i][key] = values[i] for every i whose value is not None.
void set_state_items(nb::list states, nb::str key, nb::list values);

void bind_tree(nb::module_& m);

} // namespace mlx_fused_sgd
