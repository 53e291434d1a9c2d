"""Benchmark of one SGD optimizer step: mlx-fused-sgd against its peers.

Workloads and method are fixed by DESIGN.md: fp32 params,
SGD(momentum=0.9, weight_decay=1e-4, step_decay(0.1, 0.9, 10)); the time of
one optimizer step including evaluation; the median over repeated steps after
warm-up. Peers, all in the same run: stock ``mlx.optimizers.SGD`` eager and
under ``mx.compile``, PyTorch ``SGD(foreach=True)`` and ``SGD(fused=True)``
with ``StepLR`` (if torch is installed), and the memory roofline (20 bytes per
parameter at the bandwidth of an in-place triad measured on this machine).

Run ``python benchmarks/bench.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

import mlx_fused_sgd as mfs

HERE = Path(__file__).resolve().parent
HYPER = dict(momentum=0.9, weight_decay=1e-4)
SCHEDULE = (0.1, 0.9, 10)
BYTES_PER_PARAM = 20  # read p, g, v; write p, v (fp32)
LOSS_SCALE = 1024.0  # for the loss-scaling rows


# --------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------


def workload_shapes(name: str) -> list[tuple[int, ...]]:
    if name == "large":
        return [(4096, 1024)] * 4
    if name == "gpt":
        shapes: list[tuple[int, ...]] = [(8192, 512)]
        for _ in range(6):
            shapes += [(512, 512), (512,)] * 4
            shapes += [(512,), (512,)] * 2
            shapes += [(2048, 512), (2048,), (512, 2048), (512,)]
        shapes += [(512,), (512,)]
        return shapes
    if name == "small":
        return [(1024,)] * 1000
    raise ValueError(f"unknown workload {name!r}; choose from large, gpt, small")


def make_tree(shapes, dtype, seed):
    keys = mx.random.split(mx.random.key(seed), len(shapes))
    tree = {
        f"t{i:04d}": (mx.random.normal(s, key=k) * 0.01).astype(dtype)
        for i, (s, k) in enumerate(zip(shapes, keys))
    }
    mx.eval(tree)
    return tree


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on stderr (no dependency)."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.t0 = total, 0, time.perf_counter()

    def advance(self, label: str) -> None:
        self.done += 1
        width = 30
        filled = int(width * self.done / self.total)
        elapsed = time.perf_counter() - self.t0
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
            f"{elapsed:6.1f}s {label:<40.40}"
        )
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def time_steps(step: Callable[[], None], warmup: int, reps: int, sync) -> list[float]:
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def mlx_runner(kind: str, shapes, dtype, device):
    """A closure doing one optimizer step of ``kind`` on a fresh tree."""
    mx.set_default_device(device)
    params = make_tree(shapes, dtype, 0)
    grads = make_tree(shapes, dtype, 1)
    loss_scale = mx.array(LOSS_SCALE)
    if kind == "fused":
        opt = mfs.FusedSGD(mfs.step_decay(*SCHEDULE), **HYPER)
    elif kind == "fused_f32_state":
        opt = mfs.FusedSGD(mfs.step_decay(*SCHEDULE), state_dtype=mx.float32, **HYPER)
    elif kind == "fused_master":
        opt = mfs.FusedSGD(
            mfs.step_decay(*SCHEDULE),
            master_weights=True,
            state_dtype=mx.float32,
            **HYPER,
        )
    elif kind == "fused_sr":
        opt = mfs.FusedSGD(mfs.step_decay(*SCHEDULE), stochastic_rounding=True, **HYPER)
    elif kind == "fused_clip":
        opt = mfs.FusedSGD(mfs.step_decay(*SCHEDULE), max_grad_norm=1.0, **HYPER)
    elif kind == "fused_grad_scale":
        opt = mfs.FusedSGD(
            mfs.step_decay(*SCHEDULE),
            grad_scale=loss_scale,
            skip_nonfinite=True,
            **HYPER,
        )
    else:
        opt = optim.SGD(optim.step_decay(*SCHEDULE), **HYPER)
    opt.init(params)
    mx.eval(opt.state)
    box = {"params": params}

    if kind == "stock_compiled":
        state = [opt.state]

        @partial(mx.compile, inputs=state, outputs=state)
        def update(g, p):
            return opt.apply_gradients(g, p)

    elif kind in ("stock_f32_state", "stock_master"):
        # float32 momentum (and, for stock_master, float32 master copies of
        # the params) for half params from stock ops: casts and the SGD
        # arithmetic per tensor, in float32 (the params rounded once).
        schedule = optim.step_decay(*SCHEDULE)
        velocities = {k: mx.zeros(v.shape, mx.float32) for k, v in params.items()}
        masters = {k: v.astype(mx.float32) for k, v in params.items()}
        counter = {"step": mx.array(0, mx.uint64)}
        opt.state["v32"] = velocities
        if kind == "stock_master":
            opt.state["master"] = masters

        def update(g, p):
            lr = schedule(counter["step"])
            counter["step"] = counter["step"] + 1
            new_p = {}
            for k, x in p.items():
                x32 = masters[k] if kind == "stock_master" else x.astype(mx.float32)
                g32 = g[k].astype(mx.float32) + HYPER["weight_decay"] * x32
                v = HYPER["momentum"] * velocities[k] + g32
                velocities[k] = v
                x32 = x32 - lr * v
                if kind == "stock_master":
                    masters[k] = x32
                new_p[k] = x32.astype(x.dtype)
            return new_p

    elif kind == "stock_clip":
        # Stock global-norm clipping: a norm and a multiply per tensor.
        def update(g, p):
            return opt.apply_gradients(optim.clip_grad_norm(g, 1.0)[0], p)

    elif kind == "stock_grad_scale":
        # Loss scaling with a skipped step on overflow, from stock ops: a
        # divide and a finite check per tensor, and a select per output.
        def keep_if_bad(ok, new, old):
            if isinstance(new, dict):
                for k in new:
                    new[k] = keep_if_bad(ok, new[k], old[k])
                return new
            if isinstance(new, (list, tuple)):
                return type(new)(keep_if_bad(ok, n, o) for n, o in zip(new, old))
            return mx.where(ok, new, old)

        def update(g, p):
            leaves = [x for _, x in tree_flatten(g)]
            ok = mx.all(mx.stack([mx.all(mx.isfinite(x)) for x in leaves]))
            old_state = tree_map(lambda x: x, opt.state)
            new_p = opt.apply_gradients(tree_map(lambda x: x / loss_scale, g), p)
            keep_if_bad(ok, opt.state, old_state)  # in place: no re-init
            return keep_if_bad(ok, new_p, p)

    else:
        update = opt.apply_gradients

    def step():
        box["params"] = update(grads, box["params"])
        mx.eval(box["params"], opt.state)

    return step, mx.synchronize


def torch_runner(kind: str, shapes):
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.01) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    flag = {"foreach": True} if kind == "torch_foreach" else {"fused": True}
    opt = torch.optim.SGD(params, lr=SCHEDULE[0], **HYPER, **flag)
    sched = torch.optim.lr_scheduler.StepLR(
        opt, step_size=SCHEDULE[2], gamma=SCHEDULE[1]
    )

    def step():
        opt.step()
        sched.step()

    return step, lambda: None


# --------------------------------------------------------------------------
# Roofline: in-place triad bandwidth
# --------------------------------------------------------------------------


def _load_triad():
    cc = (
        shutil.which(os.environ.get("CC", "cc"))
        or shutil.which("gcc")
        or shutil.which("clang")
    )
    if cc is None:
        return None, "no C compiler"
    out = Path(tempfile.mkdtemp()) / "libtriad.so"
    for flags in (["-fopenmp"], []):
        cmd = [
            cc,
            "-O3",
            "-march=native",
            "-shared",
            "-fPIC",
            *flags,
            str(HERE / "triad.c"),
            "-o",
            str(out),
        ]
        if subprocess.run(cmd, capture_output=True).returncode == 0:
            lib = ctypes.CDLL(str(out))
            lib.triad.argtypes = [
                ctypes.c_void_p,
                ctypes.c_void_p,
                ctypes.c_float,
                ctypes.c_size_t,
            ]
            return lib, "C triad" + (" + OpenMP" if flags else " (1 thread)")
    return None, "C triad failed to build"


def triad_bandwidth(n: int = 1 << 25, reps: int = 15) -> tuple[float, str]:
    """Bytes per second of ``b += s * c`` (12 bytes per element)."""
    b = np.ones(n, np.float32)
    c = np.ones(n, np.float32)
    lib, how = _load_triad()
    if lib is not None:

        def run():
            lib.triad(b.ctypes.data, c.ctypes.data, ctypes.c_float(1e-3), n)
    else:
        how = f"NumPy in-place multiply-add ({how}; two passes, a pessimistic roofline)"

        def run():
            b.__iadd__(c * np.float32(1e-3))

    run()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return 12 * n / statistics.median(times), how


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


IMPLS = ["fused", "stock_eager", "stock_compiled", "torch_foreach", "torch_fused"]
# Optional rows (--impls): the cost of global-norm clipping (max_grad_norm),
# of loss scaling with skip on non-finite gradients (grad_scale +
# skip_nonfinite), of float32 momentum for half params (state_dtype; run
# with --dtype bfloat16), of float32 master weights (with float32 momentum),
# fused vs stock ops; and of stochastic rounding (bfloat16; stock MLX has no
# counterpart).
EXTRA_IMPLS = [
    "fused_clip",
    "stock_clip",
    "fused_grad_scale",
    "stock_grad_scale",
    "fused_f32_state",
    "stock_f32_state",
    "fused_master",
    "stock_master",
    "fused_sr",
]
LABELS = {
    "fused": "mlx-fused-sgd",
    "stock_eager": "stock eager",
    "stock_compiled": "stock mx.compile",
    "torch_foreach": "torch foreach",
    "torch_fused": "torch fused",
    "fused_f32_state": "fused f32 state",
    "stock_f32_state": "stock f32 state",
    "fused_master": "fused master wts",
    "stock_master": "stock master wts",
    "fused_sr": "fused stoch. round",
    "fused_clip": "fused +clip",
    "stock_clip": "stock +clip",
    "fused_grad_scale": "fused +scale",
    "stock_grad_scale": "stock +scale",
    "roofline": "roofline",
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--workloads",
        nargs="+",
        default=["large", "gpt", "small"],
        choices=["large", "gpt", "small"],
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument(
        "--dtype", default="float32", choices=["float32", "float16", "bfloat16"]
    )
    ap.add_argument("--reps", type=int, default=20, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS + EXTRA_IMPLS)
    ap.add_argument(
        "--out", default=str(HERE / "results"), help="folder for JSON and PNG"
    )
    args = ap.parse_args(argv)

    device = mx.gpu if args.device == "gpu" else mx.cpu
    if args.device == "gpu" and not mx.metal.is_available():
        ap.error("--device gpu needs MLX with Metal (Apple silicon)")
    dtype = getattr(mx, args.dtype)
    try:
        import torch  # noqa: F401

        have_torch = True
    except ImportError:
        have_torch = False
    impls = [i for i in args.impls if have_torch or not i.startswith("torch")]
    if have_torch and args.device != "cpu":
        impls = [i for i in impls if not i.startswith("torch")]  # torch peers are CPU

    bw, bw_how = triad_bandwidth()
    results = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "mlx": mx.__version__,
            "torch": __import__("torch").__version__ if have_torch else None,
            "device": args.device,
            "dtype": args.dtype,
            "triad_GBps": bw / 1e9,
            "triad_method": bw_how,
        },
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "workloads": {},
    }
    progress = Progress(len(args.workloads) * len(impls))
    for wl in args.workloads:
        shapes = workload_shapes(wl)
        n_params = sum(int(np.prod(s)) for s in shapes)
        # 20 bytes per fp32 parameter; half types move half as many bytes.
        bytes_per_param = BYTES_PER_PARAM * dtype.size / 4
        row = {
            "tensors": len(shapes),
            "params": n_params,
            "roofline_ms": bytes_per_param * n_params / bw * 1e3,
        }
        for impl in impls:
            progress.advance(f"{wl}: {LABELS[impl]}")
            if impl.startswith("torch"):
                step, sync = torch_runner(impl, shapes)
            else:
                step, sync = mlx_runner(impl, shapes, dtype, device)
            times = time_steps(step, args.warmup, args.reps, sync)
            row[impl + "_ms"] = statistics.median(times)
            del step
        results["workloads"][wl] = row

    print_table(results, impls)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2))
    print(f"\nJSON: {out / 'bench.json'}")
    png = plot(results, impls, out / "bench.png")
    print(f"PNG:  {png}" if png else "PNG:  skipped (pip install matplotlib)")
    return 0


def _ratio(x: float, width: int, digits: int) -> str:
    """A ratio for the table; "-" where its rows were not run."""
    text = f"{x:.{digits}f}x" if math.isfinite(x) else "-"
    return text.rjust(width)


def print_table(results, impls) -> None:
    m = results["machine"]
    print(
        f"\n{m['platform']}, {m['cpus']} CPUs, MLX {m['mlx']}, torch {m['torch']}, "
        f"device {m['device']}, {m['dtype']}"
    )
    print(f"triad bandwidth {m['triad_GBps']:.1f} GB/s ({m['triad_method']})\n")
    cols = ["roofline", *impls]
    head = f"{'workload':<8} {'tensors':>7} {'params':>8} | " + " ".join(
        f"{LABELS[c]:>16}" for c in cols
    )
    print(head + f" | {'fused/roofline':>14} {'eager/fused':>11}")
    print("-" * len(head) + "-" * 29)
    for wl, row in results["workloads"].items():
        cells = " ".join(f"{row.get(c + '_ms', float('nan')):>13.2f} ms" for c in cols)
        ratio_roof = (
            row["fused_ms"] / row["roofline_ms"] if "fused_ms" in row else float("nan")
        )
        ratio_eager = (
            row.get("stock_eager_ms", float("nan")) / row["fused_ms"]
            if "fused_ms" in row
            else float("nan")
        )
        sizes = f"{wl:<8} {row['tensors']:>7} {row['params'] / 1e6:>7.1f}M"
        ratios = f"{_ratio(ratio_roof, 14, 2)} {_ratio(ratio_eager, 11, 1)}"
        print(f"{sizes} | {cells} | {ratios}")


def plot(results, impls, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cols = ["roofline", *impls]
    wls = list(results["workloads"])
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / len(cols)
    for j, c in enumerate(cols):
        vals = [results["workloads"][w].get(c + "_ms", np.nan) for w in wls]
        ax.bar(np.arange(len(wls)) + j * width, vals, width, label=LABELS[c])
    ax.set_xticks(np.arange(len(wls)) + width * (len(cols) - 1) / 2, wls)
    ax.set_yscale("log")
    ax.set_ylabel("ms per optimizer step (log scale)")
    m = results["machine"]
    ax.set_title(
        f"SGD step, {m['dtype']} on {m['device']} ({m['cpus']} CPUs, MLX {m['mlx']})"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


if __name__ == "__main__":
    sys.exit(main())
