"""Why FusedSGD keeps its outputs row-major: the same weights stored
column-major (the layout of their transposed gradients) change MLX's own
arithmetic in the forward and backward pass.

For each real model of bench.py: one forward and backward with the weights
as MLX creates them, then with every weight whose gradient is transposed
copied into column-major storage (same values), and whether the loss and the
gradients are bit-identical; and the forward and backward time of each.

    python benchmarks/studies/colmajor_weights.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench  # noqa: E402


def column_major(p: mx.array, g: mx.array) -> mx.array:
    """``p`` in column-major storage where its gradient is transposed."""
    if g.ndim >= 2 and not memoryview(g).c_contiguous:
        return mx.contiguous(p.swapaxes(-1, -2)).swapaxes(-1, -2)
    return p


def forward_backward(w, batch):
    """One forward and backward: the loss and the flat gradients."""
    loss, g = nn.value_and_grad(w.model, w.loss)(w.model, *batch)
    mx.eval(loss, g)
    return loss, dict(tree_flatten(g))


def median_ms(w, batch, reps: int = 9) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        forward_backward(w, batch)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workloads", nargs="+", default=["mlp", "decoder", "convnet"])
    ap.add_argument("--reps", type=int, default=9)
    args = ap.parse_args()
    for name in args.workloads:
        w, batch, grads = bench.real_workload(name, mx.float32)
        params = w.model.trainable_parameters()
        loss0, g0 = forward_backward(w, batch)
        row_ms = median_ms(w, batch, args.reps)
        moved = tree_map(column_major, params, grads)
        mx.eval(moved)
        w.model.update(moved)
        loss1, g1 = forward_backward(w, batch)
        col_ms = median_ms(w, batch, args.reps)
        w.model.update(params)
        same = sum(mx.array_equal(g0[k], g1[k]).item() for k in g0)
        worst = max(mx.abs(g0[k] - g1[k]).max().item() for k in g0)
        print(
            f"{name:8s} weights moved {bench.not_row_contiguous(grads):3d}: loss "
            f"{'identical' if mx.array_equal(loss0, loss1).item() else 'differs'}, "
            f"gradients identical {same}/{len(g0)} (largest difference "
            f"{worst:.1e}); forward+backward {row_ms:.1f} ms row-major, "
            f"{col_ms:.1f} ms column-major"
        )


if __name__ == "__main__":
    main()
