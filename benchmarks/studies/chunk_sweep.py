"""Measure the FusedSGD step for each ``tensors_per_primitive`` on the three
workloads: the measurement behind the default chunk size.

    python benchmarks/studies/chunk_sweep.py [--chunks 1 2 4 8 16 32] [--reps 20]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import HYPER, SCHEDULE, make_tree, workload_shapes  # noqa: E402

import mlx_fused_sgd as mfs  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--workloads", nargs="+", default=["large", "gpt", "small"])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    print(
        f"{'workload':<8} "
        + " ".join(f"{c:>8}" for c in args.chunks)
        + "   (ms per step, median)"
    )
    for wl in args.workloads:
        shapes = workload_shapes(wl)
        params = list(make_tree(shapes, mx.float32, 0).values())
        grads = list(make_tree(shapes, mx.float32, 1).values())
        vels = [mx.zeros_like(p) for p in params]
        mx.eval(vels)
        step = mx.array(5, mx.uint64)
        row = []
        for chunk in args.chunks:
            box = {"p": params, "v": vels}

            def run(box=box, chunk=chunk, grads=grads, step=step):
                p, v = mfs.sgd_update_many_scheduled(
                    box["p"],
                    grads,
                    box["v"],
                    step=step,
                    schedule=mfs.step_decay(*SCHEDULE),
                    **HYPER,
                    tensors_per_primitive=chunk,
                )
                box["p"], box["v"] = p, v
                mx.eval(p, v)

            for _ in range(3):
                run()
            times = []
            for _ in range(args.reps):
                t0 = time.perf_counter()
                run()
                times.append((time.perf_counter() - t0) * 1e3)
            row.append(statistics.median(times))
        print(f"{wl:<8} " + " ".join(f"{t:>8.2f}" for t in row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
