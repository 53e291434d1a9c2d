// The optimizer's per-step tree work in C++: flattening the gradient tree
// with its params and per-parameter state, rebuilding the result tree, and
// committing the new momentum buffers. In Python these were loops over every
// parameter on the hot path (about 0.3 ms a step for 1000 tensors).
//
// The walk follows mlx.utils.tree_map's rule (docs/guarantees.md, "The
// tree rule"): the gradient tree drives it; each gradient dict, list or
// tuple indexes the params (and the state) by its own keys or positions,
// whatever they hold there, so an empty one reads nothing. The gradients
// handled here are plain dicts, lists and tuples of mx.array leaves. Anything
// else (a failed lookup, a leaf that is not an mx.array on either side, a
// dict subclass or namedtuple of gradients, an array subclass, a missing
// state entry) returns None, and the Python walk runs instead: it raises the
// error with the parameter's path, or handles the unusual container, so both
// walks agree by construction.
#include "tree.h"

#include <nanobind/stl/optional.h>

#include "mlx/array.h"

namespace mlx_fused_sgd {

namespace {

namespace mx = mlx::core;
using namespace nb::literals;

// An empty object for a failed lookup: the Python walk then runs and
// raises its own error. An exception that is not an Exception (a
// KeyboardInterrupt in a __getitem__) is raised, not swallowed.
nb::object lookup_failed() {
  if (PyErr_Occurred() && !PyErr_ExceptionMatches(PyExc_Exception)) {
    throw nb::python_error();
  }
  PyErr_Clear();
  return nb::object();
}

// A new reference to container[key], or an empty object (lookup_failed).
// Plain dicts are read directly; anything else through its __getitem__.
nb::object get_item(nb::handle container, nb::handle key) {
  if (PyDict_CheckExact(container.ptr())) {
    PyObject* item = PyDict_GetItemWithError(container.ptr(), key.ptr());
    return item != nullptr ? nb::borrow(item) : lookup_failed();
  }
  PyObject* item = PyObject_GetItem(container.ptr(), key.ptr());
  return item != nullptr ? nb::steal(item) : lookup_failed();
}

nb::object get_index(nb::handle container, Py_ssize_t i) {
  nb::object key = nb::int_(i);
  return get_item(container, key);
}

bool is_leaf(nb::handle x) {
  static const nb::handle array_type = nb::type<mx::array>();
  return x.type().is(array_type);
}

// Deeper trees go to the Python walk (which raises RecursionError where
// Python's limit says so) rather than deep into the C++ stack.
constexpr int kMaxDepth = 200;

bool is_list_or_tuple(nb::handle x) {
  return PyList_CheckExact(x.ptr()) || PyTuple_CheckExact(x.ptr());
}

struct Collector {
  nb::handle state_key; // empty: per-parameter state dicts, not an entry
  bool with_state;
  // The lists returned; each append takes its own reference.
  nb::list grads, params, states, entries;

  // One leaf (or subtree) g of the gradients with its param p and state s.
  bool walk(nb::handle g, nb::handle p, nb::handle s, int depth = 0) {
    if (depth > kMaxDepth) {
      return false;
    }
    if (is_leaf(g)) {
      if (!is_leaf(p)) {
        return false;
      }
      grads.append(g);
      params.append(p);
      if (with_state) {
        if (state_key) {
          nb::object entry = get_item(s, state_key);
          // A missing entry, or one that is not an mx.array (a NumPy array
          // in a hand-edited state): the Python walk handles it.
          if (!entry.is_valid() || !is_leaf(entry)) {
            return false;
          }
          entries.append(entry);
        }
        states.append(s);
      }
      return true;
    }
    // As tree_map: a container of gradients indexes the params by each of
    // its keys or positions, whatever the params are there (a dict, an
    // nn.Module, a list, a string); an empty one reads nothing.
    if (PyDict_CheckExact(g.ptr())) {
      PyObject *key, *value;
      Py_ssize_t pos = 0;
      while (PyDict_Next(g.ptr(), &pos, &key, &value)) {
        // Strong references: a lookup may run Python code.
        nb::object k = nb::borrow(key), v = nb::borrow(value);
        nb::object sub_p = get_item(p, k);
        if (!sub_p.is_valid()) {
          return false;
        }
        nb::object sub_s;
        if (with_state) {
          sub_s = get_item(s, k);
          if (!sub_s.is_valid()) {
            return false;
          }
        }
        if (!walk(v, sub_p, sub_s, depth + 1)) {
          return false;
        }
      }
      return true;
    }
    if (is_list_or_tuple(g)) {
      const Py_ssize_t n = PyObject_Length(g.ptr());
      for (Py_ssize_t i = 0; i < n; ++i) {
        nb::object sub_g = get_index(g, i), sub_p = get_index(p, i);
        nb::object sub_s;
        if (with_state) {
          sub_s = get_index(s, i);
          if (!sub_s.is_valid()) {
            return false;
          }
        }
        if (!sub_g.is_valid() || !sub_p.is_valid() ||
            !walk(sub_g, sub_p, sub_s, depth + 1)) {
          return false;
        }
      }
      return true;
    }
    return false; // an array subclass, a namedtuple, a bad leaf: Python's
  }
};

// A tree shaped like g holding the next leaves (see rebuild_tree).
bool rebuild(
    nb::handle g,
    nb::handle leaves,
    Py_ssize_t& next,
    nb::object& out,
    int depth = 0) {
  if (depth > kMaxDepth) {
    return false;
  }
  if (is_leaf(g)) {
    if (next >= PyList_Size(leaves.ptr())) {
      return false;
    }
    out = nb::borrow(PyList_GetItem(leaves.ptr(), next++));
    return true;
  }
  if (PyDict_CheckExact(g.ptr())) {
    nb::dict d;
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(g.ptr(), &pos, &key, &value)) {
      nb::object k = nb::borrow(key), v = nb::borrow(value), sub;
      if (!rebuild(v, leaves, next, sub, depth + 1)) {
        return false;
      }
      d[k] = sub;
    }
    out = std::move(d);
    return true;
  }
  if (is_list_or_tuple(g)) {
    const Py_ssize_t n = PyObject_Length(g.ptr());
    nb::list items;
    for (Py_ssize_t i = 0; i < n; ++i) {
      nb::object sub_g = get_index(g, i), sub;
      if (!sub_g.is_valid() || !rebuild(sub_g, leaves, next, sub, depth + 1)) {
        return false;
      }
      items.append(sub);
    }
    out = PyTuple_CheckExact(g.ptr()) ? nb::object(nb::tuple(items))
                                      : nb::object(items);
    return true;
  }
  return false;
}

} // namespace

nb::object collect_tree(
    nb::handle grads,
    nb::handle params,
    nb::handle state,
    std::optional<nb::str> state_key) {
  Collector c;
  c.with_state = !state.is_none();
  if (state_key) {
    c.state_key = *state_key;
  }
  if (!c.walk(grads, params, state)) {
    return nb::none();
  }
  return nb::make_tuple(c.grads, c.params, c.states, c.entries);
}

nb::object rebuild_tree(nb::handle grads, nb::list leaves) {
  Py_ssize_t next = 0;
  nb::object out;
  if (!rebuild(grads, leaves, next, out) || next != nb::len(leaves)) {
    return nb::none();
  }
  return out;
}

void set_state_items(nb::list states, nb::str key, nb::list values) {
  const size_t n = nb::len(states);
  if (nb::len(values) != n) {
    throw nb::value_error("set_state_items: as many values as states needed");
  }
  for (size_t i = 0; i < n; ++i) {
    nb::object value = values[i];
    if (!value.is_none()) {
      states[i][key] = value;
    }
  }
}

void bind_tree(nb::module_& m) {
  m.def(
      "collect_tree",
      &collect_tree,
      "grads"_a,
      "params"_a,
      "state"_a.none(),
      "state_key"_a.none() = nb::none(),
      nb::sig("def collect_tree(grads: object, params: object, state: object "
              "| None, state_key: str | None = None) -> "
              "tuple[list[mlx.core.array], list[mlx.core.array], list[dict], "
              "list[mlx.core.array]] | None"),
      "The leaves of ``grads`` with their ``params``, per-parameter "
      "``state`` dicts (``state`` None: none) and each one's "
      "``state_key`` entry, as four lists; None where the Python walk "
      "must run (a mismatch, to raise its error; a namedtuple; an array "
      "subclass; a missing entry).");
  m.def(
      "rebuild_tree",
      &rebuild_tree,
      "grads"_a,
      "leaves"_a,
      nb::sig("def rebuild_tree(grads: object, leaves: list[mlx.core.array]) "
              "-> typing.Any"),
      "A tree shaped like ``grads`` holding ``leaves`` in order (dicts "
      "come back as plain dicts, as tree_map builds them); None where the "
      "Python rebuild must run (a namedtuple, an array subclass).");
  m.def(
      "set_state_items",
      &set_state_items,
      "states"_a,
      "key"_a,
      "values"_a,
      nb::sig("def set_state_items(states: list[dict], key: str, values: "
              "typing.Sequence[mlx.core.array | None]) -> None"),
      "``states[i][key] = values[i]`` for every i whose value is not None.");
}

} // namespace mlx_fused_sgd
