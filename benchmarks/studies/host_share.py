"""Where the 1000-tensor step's time goes on the host, and what the tree
work costs in Python and in C++.

Times FusedSGD.apply_gradients on 1000 x (1024,) float32 tensors (momentum,
weight decay, step decay) split into the C++ op that builds the graph, the
Python around it (the tree walk, the result tree, the state commit, and
releasing the previous step's arrays) and the evaluation. Then the tree walk,
the result tree and the commit as FusedSGD runs them (C++, csrc/tree.cpp)
against the Python walk that handles everything else, and against the least
any cache could do per step (direct key lookups with no checks at all); and
the whole step with each, in interleaved rounds. Last, the convnet's step
(few small tensors, in cache) split the same way, against the least an
evaluation costs in MLX here.

    python benchmarks/studies/host_share.py [--quick]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench  # noqa: E402

import mlx_fused_sgd as mfs  # noqa: E402
from mlx_fused_sgd import optimizer as opt_module  # noqa: E402

STEPS = 400
SKIP = 50  # the first steps warm the allocator up


def _median_us(fn, n: int = 300) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def _build_and_evaluate(opt, grads, params, steps: int):
    """``steps`` optimizer steps: the new params, and each step's time to
    build (apply_gradients) and to evaluate."""
    build, evaluate = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        params = opt.apply_gradients(grads, params)
        t1 = time.perf_counter()
        mx.eval(params, opt.state)
        build.append(t1 - t0)
        evaluate.append(time.perf_counter() - t1)
    return params, build, evaluate


def main() -> None:
    quick = "--quick" in sys.argv[1:]  # a smoke run: few steps
    steps = 60 if quick else STEPS
    shapes = bench.workload_shapes("small")
    params = bench.make_tree(shapes, mx.float32, 0)
    grads = bench.make_tree(shapes, mx.float32, 1)
    mx.eval(params, grads)
    opt = mfs.FusedSGD(mfs.step_decay(*bench.SCHEDULE), **bench.HYPER)
    opt.init(params)

    # Time the C++ op inside apply_gradients by wrapping it.
    ext = opt_module._ext
    original = ext.sgd_update
    op_times: list[float] = []

    def timed_op(*args, **kwargs):
        t0 = time.perf_counter()
        out = original(*args, **kwargs)
        op_times.append(time.perf_counter() - t0)
        return out

    ext.sgd_update = timed_op
    try:
        params, build, evaluate = _build_and_evaluate(opt, grads, params, steps)
    finally:
        ext.sgd_update = original

    def ms(x: list[float]) -> float:
        return statistics.median(x[SKIP:]) * 1e3

    print(f"1000 x (1024,) float32, median of {steps - SKIP} steps")
    print(
        f"  apply_gradients {ms(build):.3f} ms: C++ op {ms(op_times):.3f} ms, "
        f"Python around it {ms(build) - ms(op_times):.3f} ms"
    )
    print(f"  evaluation      {ms(evaluate):.3f} ms")

    state = opt.state
    keys = tuple(grads.keys())
    ext = opt_module._ext

    def walk():
        return opt._collect_checked(grads, params, True)

    def lookups():
        [grads[k] for k in keys]
        [params[k] for k in keys]
        return [state[k]["v"] for k in keys]

    _, leaves, states, values = ext.collect_tree(grads, params, state, "v")

    def commit():
        _set_items_in_python(states, "v", values)

    print("  per step, C++ (FusedSGD) against Python:")
    for what, cxx, python in (
        ("tree walk  ", lambda: ext.collect_tree(grads, params, state, "v"), walk),
        (
            "result tree",
            lambda: ext.rebuild_tree(grads, leaves),
            lambda: opt_module._rebuild(grads, iter(leaves)),
        ),
        ("commit     ", lambda: ext.set_state_items(states, "v", values), commit),
    ):
        print(
            f"    {what} {_median_us(cxx):6.1f} us against {_median_us(python):6.1f} us"
        )
    zipped = _median_us(lambda: dict(zip(keys, leaves)))
    print(
        f"    (direct key lookups, no checks: {_median_us(lookups):6.1f} us; "
        f"dict(zip(keys, leaves)): {zipped:6.1f} us)"
    )
    whole_step(opt, grads, params, *((1, 10) if quick else ()))


def _set_items_in_python(states, key, values) -> None:
    """What _ext.set_state_items does, as the Python loop it replaced."""
    for s, v in zip(states, values):
        if v is not None:
            s[key] = v


def whole_step(opt, grads, params, rounds: int = 8, steps: int = 150) -> None:
    """The step with the C++ tree work against the same step with the Python
    walk, rebuild and commit, in interleaved rounds."""
    ext = opt_module._ext
    cxx = (ext.collect_tree, ext.rebuild_tree, ext.set_state_items)
    # None from the C++ walk and rebuild sends FusedSGD to its Python ones.
    python = (lambda *a: None, lambda *a: None, _set_items_in_python)
    medians: dict[str, list[float]] = {"C++": [], "Python": []}
    try:
        for _ in range(rounds):
            for name, fns in (("Python", python), ("C++", cxx)):
                ext.collect_tree, ext.rebuild_tree, ext.set_state_items = fns
                times = []
                for _ in range(steps):
                    t0 = time.perf_counter()
                    params = opt.apply_gradients(grads, params)
                    mx.eval(params, opt.state)
                    times.append(time.perf_counter() - t0)
                medians[name].append(statistics.median(times[steps // 5 :]) * 1e3)
    finally:
        ext.collect_tree, ext.rebuild_tree, ext.set_state_items = cxx
    ratio = statistics.median(a / b for a, b in zip(medians["C++"], medians["Python"]))
    print(
        f"  whole step, {rounds} interleaved rounds: C++ tree work "
        f"{statistics.median(medians['C++']):.3f} ms, Python "
        f"{statistics.median(medians['Python']):.3f} ms (paired ratio {ratio:.2f}x)"
    )


def convnet() -> None:
    """The convnet's step (14 tensors, 0.37M parameters, in cache): the host
    time that builds it, its evaluation, and the least any evaluation costs
    here (MLX evaluating one add of 10 elements)."""
    w, _, grads = bench.real_workload("convnet", mx.float32)
    params = w.model.trainable_parameters()
    opt = mfs.FusedSGD(mfs.step_decay(*bench.SCHEDULE), **bench.HYPER)
    _, build, evaluate = _build_and_evaluate(opt, grads, params, 4 * STEPS)
    x = mx.ones((10,))
    mx.eval(x)
    floor = _median_us(lambda: mx.eval(x + 1), n=4 * STEPS)

    def us(t: list[float]) -> float:
        return statistics.median(t[4 * SKIP :]) * 1e6

    print(f"convnet, median of {4 * (STEPS - SKIP)} steps")
    print(f"  apply_gradients {us(build):6.1f} us, evaluation {us(evaluate):6.1f} us")
    print(f"  mx.eval(x + 1), 10 elements: {floor:6.1f} us")


if __name__ == "__main__":
    main()
    convnet()
