// The threads of one GPU threadgroup (Metal) or block (CUDA), run on the CPU
// as fibers (ucontext) on the calling thread, for the Linux models of both
// backends (tests/metal_shim, tests/cuda_shim). Each thread runs until it
// waits at a collective operation (a SIMD sum, a shuffle, a barrier) or
// returns; once none can go on, the model's `resolve` decides which waiting
// threads are released and with what result, or reports the group divergent
// (a thread returned before a barrier, which hangs a GPU; or threads stuck in
// different operations). Memory a kernel shares across its threadgroup is a
// static array: the fibers run one group at a time.
#pragma once

#include <ucontext.h>

#include <functional>
#include <memory>
#include <vector>

namespace mfs_fibers {

enum class State { running, waiting, done };

struct Group {
  ucontext_t scheduler;
  std::vector<ucontext_t> contexts;
  std::vector<State> states;
  std::vector<int> ops;       // the operation a waiting thread is at
  std::vector<float> values;  // what it brought
  std::vector<int> args;      // the operation's argument (a shuffle offset)
  std::vector<float> results; // what it gets back
  std::function<void(unsigned)> body;
  unsigned current = 0;
};

inline Group*& active() {
  static Group* group = nullptr;
  return group;
}

inline void trampoline() {
  Group& g = *active();
  g.body(g.current);
  g.states[g.current] = State::done;
}

// Called by a collective operation: waits until the model resolves it.
// Outside a group (a kernel called on its own) the thread is a group of one
// and gets `alone`.
inline float wait_for(int op, float value, int arg, float alone) {
  Group* g = active();
  if (g == nullptr) {
    return alone;
  }
  const unsigned t = g->current;
  g->values[t] = value;
  g->ops[t] = op;
  g->args[t] = arg;
  g->states[t] = State::waiting;
  swapcontext(&g->contexts[t], &g->scheduler);
  return g->results[t];
}

// Runs body(i) for the threads 0..n-1 of one group; `resolve` releases
// waiting threads (sets them running, with their results) and returns true,
// or returns false when nothing can go on. False if divergent.
inline bool
run(unsigned n,
    std::function<void(unsigned)> body,
    const std::function<bool(Group&)>& resolve) {
  constexpr size_t kStack = 64 * 1024;
  static std::vector<std::unique_ptr<char[]>> stacks;
  while (stacks.size() < n) {
    stacks.push_back(std::make_unique<char[]>(kStack));
  }
  Group g;
  g.contexts.resize(n);
  g.states.assign(n, State::running);
  g.ops.assign(n, 0);
  g.values.assign(n, 0.0f);
  g.args.assign(n, 0);
  g.results.assign(n, 0.0f);
  g.body = std::move(body);
  active() = &g;
  for (unsigned i = 0; i < n; ++i) {
    getcontext(&g.contexts[i]);
    g.contexts[i].uc_stack.ss_sp = stacks[i].get();
    g.contexts[i].uc_stack.ss_size = kStack;
    g.contexts[i].uc_link = &g.scheduler;
    makecontext(&g.contexts[i], trampoline, 0);
  }
  bool ok = true;
  for (;;) {
    for (unsigned i = 0; i < n; ++i) {
      if (g.states[i] == State::running) {
        g.current = i;
        swapcontext(&g.scheduler, &g.contexts[i]);
      }
    }
    bool finished = true;
    for (unsigned i = 0; i < n; ++i) {
      finished = finished && g.states[i] == State::done;
    }
    if (finished) {
      break;
    }
    if (!resolve(g)) {
      ok = false;
      break;
    }
  }
  active() = nullptr;
  return ok;
}

} // namespace mfs_fibers
