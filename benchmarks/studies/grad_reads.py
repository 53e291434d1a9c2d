"""Read speed of the gradient reads that max_grad_norm and skip_nonfinite add
before the update: the global squared norm and the non-finite check, alone.

    python benchmarks/studies/grad_reads.py [--tensors 6] [--size 4194304] [--reps 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx

from mlx_fused_sgd import _ext


def median_ms(fn, reps: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        mx.eval(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tensors", type=int, default=6)
    ap.add_argument("--size", type=int, default=1 << 22)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument(
        "--dtype", default="float32", choices=["float32", "float16", "bfloat16"]
    )
    args = ap.parse_args()
    dtype = getattr(mx, args.dtype)
    grads = [
        mx.random.normal((args.size,), key=mx.random.key(i)).astype(dtype)
        for i in range(args.tensors)
    ]
    mx.eval(grads)
    nbytes = sum(g.nbytes for g in grads)
    print(f"{args.tensors} x {args.size} {args.dtype}, CPU loop {_ext.cpu_isa()}")
    for name, fn in [
        ("squared norm", lambda: _ext.grads_sq_norm(grads)),
        ("non-finite check", lambda: _ext.grads_nonfinite(grads)),
    ]:
        ms = median_ms(fn, args.reps)
        print(f"{name:>17}: {ms:6.2f} ms  {nbytes / ms / 1e6:5.1f} GB/s")


if __name__ == "__main__":
    main()
