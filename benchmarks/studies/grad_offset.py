"""Where the gradient's buffer starts, and the transposed update's speed.

FusedSGD on the MLP's real gradients (three of them transposed) as
nn.value_and_grad returns them, in MLX's own buffers (which start 24 bytes
into a page), and the same values copied into buffers whose data starts 8
and 40 bytes further on (views made with mx.as_strided), each against the
same values made contiguous; interleaved rounds, medians of per-round
ratios.

    python benchmarks/studies/grad_offset.py [rounds]
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_map

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench  # noqa: E402


def shifted(g: mx.array, k: int) -> mx.array:
    """``g`` (transposed) with its data ``k`` elements into a new buffer."""
    if memoryview(g).c_contiguous:
        return g
    rows, cols = g.shape
    flat = mx.concatenate([mx.zeros((k,), g.dtype), g.T.flatten()])
    view = mx.as_strided(flat, (rows, cols), (1, rows), k)
    mx.eval(view)
    return view


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 11
    w, _, grads = bench.real_workload("mlp", mx.float32)
    params = w.model.parameters()
    contiguous = tree_map(mx.contiguous, grads)
    mx.eval(contiguous)
    variants = {
        "as MLX returns them": grads,
        "8 bytes further": tree_map(lambda g: shifted(g, 2), grads),
        "40 bytes further": tree_map(lambda g: shifted(g, 10), grads),
        "contiguous": contiguous,
    }
    runners = {k: bench.mlx_runner("fused", params, g) for k, g in variants.items()}
    medians = bench.measure_rounds(
        runners, rounds, 15, 1, bench.Progress(rounds), "gradient offsets"
    )
    row: dict = {}
    bench.summarize(medians, row)
    for name in runners:
        print(
            f"{name:20s} {row[f'{name}_ms']:6.2f} ms  "
            f"{bench.paired_ratio(row, name, 'contiguous'):.2f}x the contiguous step"
        )


if __name__ == "__main__":
    main()
