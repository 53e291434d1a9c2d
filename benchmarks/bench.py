"""Benchmark of the SGD optimizer step: mlx-fused-sgd against its peers.

Every workload: fp32 params, SGD(momentum=0.9, weight_decay=1e-4,
step_decay(0.1, 0.9, 10)); the time of one optimizer step including
evaluation. Peers, all in the same run: stock ``mlx.optimizers.SGD`` eager and
under ``mx.compile``, PyTorch ``SGD(foreach=True)`` and ``SGD(fused=True)``
with ``StepLR`` (if torch is installed; on the same device: the CPU, or with
``--device gpu`` PyTorch's CUDA or MPS device), and the memory roofline (20
bytes per parameter at the device's bandwidth: on the CPU an in-place triad
over buffers MLX allocated, on a GPU the faster of MLX's triad there and
PyTorch's device-to-device copy, measured in the same run).

Real models first (an MLP, a GPT-style decoder, a convnet from
``mlx_fused_sgd.examples.models``; mlx-lm's Llama, fully fine-tuned and with
LoRA adapters, trained through the step mlx-lm's trainer compiles; and, when
named with ``--workloads``, a 1B-parameter decoder for a large GPU): their
gradients come from
``nn.value_and_grad`` with the layouts MLX produces (every ``nn.Linear``
weight gradient is a transposed view). For them the whole training step
(forward, backward, update) is timed too, eager and under MLX's compile
idiom. Then synthetic workloads with contiguous random gradients.

Implementations and the roofline are measured in interleaved rounds (every
round times each of them once), so a busy machine shows up as spread: the
tables give the median and the JSON the min and max of the round medians,
and a warning is printed when the spread passes 15% or a step beats the
roofline.

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
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

import mlx_fused_sgd as mfs
from mlx_fused_sgd.examples import models

HERE = Path(__file__).resolve().parent
HYPER = dict(momentum=0.9, weight_decay=1e-4)
SCHEDULE = (0.1, 0.9, 10)
BYTES_PER_PARAM = 20  # read p, g, v; write p, v (fp32)
LOSS_SCALE = 1024.0  # for the loss-scaling rows
SPREAD_WARNING = 0.15
SETTLE_S = 0.05  # pause between implementations (see measure_rounds)
RESUME_S = 0.02  # untimed steps after that pause (see measure_rounds)

# --------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------


def gpt_shapes(
    vocab: int, dims: int, heads: int, layers: int, context: int
) -> list[tuple[int, ...]]:
    """The parameter shapes of ``models.gpt`` with these sizes (``heads``
    changes none of them)."""
    shapes: list[tuple[int, ...]] = [(vocab, dims), (context, dims)]
    for _ in range(layers):
        shapes += [(dims,), (dims,)] * 2  # the two LayerNorms
        shapes += [(dims, dims), (dims,)] * 4  # attention projections
        shapes += [(4 * dims, dims), (4 * dims,), (dims, 4 * dims), (dims,)]
    return shapes + [(dims,), (dims,), (vocab, dims)]


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
    if name == "gpt-1b":
        return gpt_shapes(**GPT_1B)
    raise ValueError(
        f"unknown workload {name!r}; choose from {', '.join(SYNTHETIC_WORKLOADS)}"
    )


GPT_1B = dict(vocab=32768, dims=2048, heads=16, layers=18, context=64)

# Real models: (factory, description). The decoder has about as many
# parameters as the synthetic "gpt" workload. The batches are small because
# MLX's CPU matrix multiply runs at about 2.5 GFLOP/s on the 2-core machine
# the README's figures come from; the batch changes neither the gradients'
# sizes nor their layouts, only the training step's forward and backward.
REAL_WORKLOADS = {
    "mlp": (
        lambda: models.mlp([1024, 2048, 2048, 1024], batch=4),
        "MLP 1024-2048-2048-1024, batch 4",
    ),
    "decoder": (
        lambda: models.gpt(8192, 512, heads=8, layers=6, context=16, batch=1),
        "GPT-style decoder: vocab 8192, d 512, 6 layers, 8 heads, 1 x 16 tokens",
    ),
    "convnet": (
        lambda: models.convnet([3, 64, 128, 256], classes=10, image=32, batch=2),
        "convnet 3-64-128-256 + BatchNorm + linear head, 2 images of 32 x 32",
    ),
    # For a GPU with about 80 GB (not run by default): with the PyTorch
    # peers the optimizer-step table holds about 60 GB at once.
    "decoder-1b": (
        lambda: models.gpt(**GPT_1B, batch=1),
        "GPT-style decoder: vocab 32768, d 2048, 18 layers, 16 heads, 1 x 64 "
        "tokens (1.04B params)",
    ),
}


# mlx-lm's Llama, as people fine-tune it with mlx-lm (in the bench extra),
# sized like the decoder above for the 2-core CPU machine: 16.0M params.
LLAMA = dict(
    model_type="llama",
    hidden_size=512,
    num_hidden_layers=4,
    intermediate_size=1408,
    num_attention_heads=8,
    num_key_value_heads=4,
    rms_norm_eps=1e-5,
    vocab_size=8192,
)
LLAMA_TOKENS = 16
LORA = {"rank": 8, "scale": 20.0, "dropout": 0.0}  # mlx_lm.lora's defaults


class MlxLmWorkload:
    """mlx-lm's Llama with mlx-lm's own loss (``default_loss``, which returns
    the loss and the token count) and batches (``iterate_batches``); with
    ``lora``, adapters from ``linear_to_lora_layers`` on every layer of the
    frozen base, as ``mlx_lm.lora`` makes them. ``extra_state`` is what
    mlx-lm's trainer adds to the compiled step's state (the random state)."""

    def __init__(self, lora: bool) -> None:
        from mlx_lm.models import llama
        from mlx_lm.tuner.trainer import default_loss
        from mlx_lm.tuner.utils import linear_to_lora_layers

        self.name = "llama-lora" if lora else "llama"
        self.model = llama.Model(llama.ModelArgs(**LLAMA))
        if lora:
            self.model.freeze()
            linear_to_lora_layers(self.model, LLAMA["num_hidden_layers"], LORA)
        self.loss = default_loss
        self.extra_state = [mx.random.state]

    def batch(self, key: mx.array) -> tuple[mx.array, mx.array]:
        from mlx_lm.tuner.trainer import iterate_batches

        n = LLAMA_TOKENS + 1
        tokens = mx.random.randint(1, LLAMA["vocab_size"], (n,), key=key).tolist()
        return next(iterate_batches([(tokens, 0)], 1, n))


def have_mlx_lm() -> bool:
    try:
        import mlx_lm  # noqa: F401
    except ImportError:
        return False
    return True


REAL_WORKLOADS.update(
    {
        "llama": (
            lambda: MlxLmWorkload(lora=False),
            "mlx-lm Llama: vocab 8192, d 512, 4 layers, 8 heads (4 KV), MLP 1408, "
            "1 x 16 tokens; full fine-tuning",
        ),
        "llama-lora": (
            lambda: MlxLmWorkload(lora=True),
            "the same Llama, LoRA rank 8 on all 4 layers (mlx-lm's "
            "linear_to_lora_layers), base frozen",
        ),
    }
)
MLX_LM_WORKLOADS = ["llama", "llama-lora"]
SYNTHETIC_WORKLOADS = ["large", "gpt", "small", "gpt-1b"]
# Sized for a large GPU; run only when named with --workloads.
GPU_WORKLOADS = ["decoder-1b", "gpt-1b"]


def real_model(name: str, dtype):
    """Real workload ``name``: the model and one batch."""
    mx.random.seed(0)
    w = REAL_WORKLOADS[name][0]()
    if dtype != mx.float32:
        w.model.set_dtype(dtype)
    mx.eval(w.model.parameters())
    batch = w.batch(mx.random.key(1))
    mx.eval(batch)
    return w, batch


def real_workload(name: str, dtype):
    """The model, one batch, and its gradients as nn.value_and_grad returns
    them."""
    w, batch = real_model(name, dtype)
    _, grads = nn.value_and_grad(w.model, w.loss)(w.model, *batch)
    mx.eval(grads)
    return w, batch, grads


def not_row_contiguous(tree) -> int:
    return sum(not memoryview(g).c_contiguous for _, g in tree_flatten(tree))


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


def measure_rounds(
    runners: dict[str, tuple[Callable[[], None], Callable[[], None]]],
    rounds: int,
    reps: int,
    warmup: int,
    progress: Progress,
    label: str,
    roofline_bytes: float | None = None,
    bandwidth: Callable[[], float] | None = None,
) -> dict[str, list[float]]:
    """Each runner's median step time (ms) in each of ``rounds`` rounds;
    every round times each runner for ``reps`` steps in turn (and, with
    ``roofline_bytes``, measures the device's bandwidth first with
    ``bandwidth``, bytes per second), so that load
    on the machine spreads over all of them alike. Each runner's turn starts
    with untimed steps (at least one, and for at least ``RESUME_S``): after
    the pause between runners an idle CPU wakes up slowly (on the 2-core
    machine of the README, a 0.16 ms step took 0.8 ms after a 50 ms
    pause), and a training loop, whose steps run back to back, never pays
    that."""
    for step, sync in runners.values():
        time_steps(step, warmup, 0, sync)
    out: dict[str, list[float]] = {name: [] for name in runners}
    if roofline_bytes is not None:
        out["roofline"] = []
    for r in range(rounds):
        progress.advance(f"{label}: round {r + 1}/{rounds}")
        if roofline_bytes is not None:
            bw = bandwidth() if bandwidth else triad_bandwidth(reps=3)[0]
            out["roofline"].append(roofline_bytes / bw * 1e3)
        for name, (step, sync) in runners.items():
            # OpenMP's threads (the triad's, PyTorch's) spin for a while after
            # their work; on a machine with few cores they would slow whatever
            # runs next. Let them go idle first, outside the timed steps.
            time.sleep(SETTLE_S)
            time_steps(step, 1, 0, sync, min_warmup_s=RESUME_S)
            out[name].append(statistics.median(time_steps(step, 0, reps, sync)))
    return out


def summarize(round_medians: dict[str, list[float]], row: dict) -> None:
    """Median, min and max over the rounds, into ``row``; every round's
    medians too (``rounds_ms``)."""
    for name, values in round_medians.items():
        row[f"{name}_ms"] = statistics.median(values)
        row[f"{name}_range_ms"] = [min(values), max(values)]
    row["rounds_ms"] = {name: list(v) for name, v in round_medians.items()}


def paired_ratio(row: dict, num: str, den: str) -> float:
    """The median over the rounds of ``num``'s round median divided by
    ``den``'s in the same round: on a busy machine both slow down together
    within a round, while the overall medians may come from rounds the load
    treated differently. NaN where either was not run."""
    rounds = row.get("rounds_ms", {})
    if num not in rounds or den not in rounds:
        return float("nan")
    return statistics.median(a / b for a, b in zip(rounds[num], rounds[den]))


def time_steps(
    step: Callable[[], None],
    warmup: int,
    reps: int,
    sync,
    min_warmup_s: float = 0.0,
) -> list[float]:
    """``reps`` timed steps (ms) after ``warmup`` untimed ones, and more
    untimed ones until ``min_warmup_s`` has passed."""
    start = time.perf_counter()
    done = 0
    while done < warmup or time.perf_counter() - start < min_warmup_s:
        step()
        sync()
        done += 1
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def mlx_runner(kind: str, params, grads):
    """A closure doing one optimizer step of ``kind`` on ``params`` (its own
    copy) with ``grads`` (shared, read only)."""
    params = tree_map(lambda x: x + 0, params)
    mx.eval(params)
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


def torch_device(device: str) -> str | None:
    """The PyTorch device that runs the peers for the benchmark's
    ``device``: the CPU, or the GPU PyTorch has (CUDA, or MPS on a Mac);
    None when PyTorch has no GPU."""
    import torch

    if device == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return None


def torch_sync(device: str) -> Callable[[], None]:
    """Waits for PyTorch's queued work on ``device``."""
    import torch

    if device == "cuda":
        return torch.cuda.synchronize
    if device == "mps":
        return torch.mps.synchronize
    return lambda: None


def torch_runner(kind: str, shapes, device: str = "cpu"):
    """PyTorch's SGD on params of ``shapes`` on ``device`` with contiguous
    gradients (the layout PyTorch's autograd gives them)."""
    import torch

    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(shape):
        return torch.randn(shape, generator=gen, device=device)

    params = [torch.nn.Parameter(randn(s) * 0.01) for s in shapes]
    for p in params:
        p.grad = randn(p.shape)
    flag = {"foreach": True} if kind == "torch_foreach" else {"fused": True}
    opt = torch.optim.SGD(params, lr=SCHEDULE[0], **HYPER, **flag)
    sched = torch.optim.lr_scheduler.StepLR(
        opt, step_size=SCHEDULE[2], gamma=SCHEDULE[1]
    )

    def step():
        opt.step()
        sched.step()

    return step, torch_sync(device)


def takes_apart(workload: str) -> bool:
    """Whether the fused step on ``workload`` is taken apart (the breakdown
    table): the same gradient values made row-contiguous, and MLX's floor
    for any step. Real models only, and not the 1B-parameter decoder:
    another copy of its gradients, params and state would add 12 GB to the
    60 its table holds."""
    return workload in REAL_WORKLOADS and workload not in GPU_WORKLOADS


def eval_floor_runner():
    """MLX's least time for any step: building and evaluating one scalar
    op (the hand-off to MLX's stream and back)."""
    x = mx.array(1.0)

    def step():
        mx.eval(x + 1)

    return step, mx.synchronize


def release_torch(device: str | None) -> None:
    """Gives PyTorch's cached GPU memory back (MLX's runners need it next)."""
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


# --------------------------------------------------------------------------
# Roofline: the device's bandwidth (an in-place triad on the CPU)
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


_TRIAD: dict = {}


def triad_buffers(n: int, memory: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Two float32 arrays of ``n`` ones for the triad, writable, and whose
    memory they are: views of buffers MLX allocated (``memory="mlx"``: the
    kind of memory the optimizer reads and writes), or NumPy's own arrays
    (``"numpy"``, and the fallback should MLX's views be read-only). They
    differ in page size: on Linux, with the kernel's default transparent
    huge page setting (madvise), NumPy asks for 2 MiB pages for large arrays
    and MLX's allocator gets 4 KiB ones, and a triad on NumPy's memory
    measured 5 to 10% faster on the README's machine."""
    if memory == "mlx":
        b, c = mx.ones((n,), stream=mx.cpu), mx.ones((n,), stream=mx.cpu)
        mx.eval(b, c)
        # Zero-copy views (MLX's buffer protocol); each keeps its array
        # alive, and nothing else holds these arrays, so writing through
        # them is private.
        views = np.asarray(b), np.asarray(c)
        if views[0].flags.writeable:
            return (*views, "MLX's buffers")
    return (
        np.ones(n, np.float32),
        np.ones(n, np.float32),
        "NumPy's buffers"
        if memory == "numpy"
        else "NumPy's buffers (MLX's are read-only)",
    )


def triad_bandwidth(
    n: int = 1 << 25, reps: int = 15, memory: str = "mlx"
) -> tuple[float, str]:
    """Bytes per second of ``b += s * c`` (12 bytes per element) over
    buffers from ``memory`` (see ``triad_buffers``)."""
    if (n, memory) not in _TRIAD:
        _TRIAD[(n, memory)] = (*triad_buffers(n, memory), *_load_triad())
    b, c, where, lib, how = _TRIAD[(n, memory)]
    if lib is not None:

        def run():
            lib.triad(b.ctypes.data, c.ctypes.data, ctypes.c_float(1e-3), n)
    else:
        how = f"NumPy in-place multiply-add ({how}; two passes, a pessimistic roofline)"

        def run():
            b.__iadd__(c * np.float32(1e-3))

    return 12 * n / median_seconds(run, reps), f"{how}, over {where}"


def median_seconds(run: Callable[[], None], reps: int) -> float:
    """The median time of ``reps`` calls of ``run`` (that waits for its
    work), after one untimed call."""
    run()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


_DEVICE_TRIAD: dict = {}


def mlx_triad_bandwidth(n: int = 1 << 26, reps: int = 15) -> tuple[float, str]:
    """Bytes per second of MLX's ``b + s * c`` compiled into one kernel on
    the default device (reads b and c, writes the result: 12 bytes per
    element), on arrays far larger than a GPU's caches."""
    if n not in _DEVICE_TRIAD:
        b, c = mx.ones((n,)), mx.ones((n,))
        mx.eval(b, c)
        _DEVICE_TRIAD[n] = (b, c, mx.compile(lambda b, c: b + 1e-3 * c))
    b, c, triad = _DEVICE_TRIAD[n]

    def run():
        mx.eval(triad(b, c))
        mx.synchronize()

    return 12 * n / median_seconds(run, reps), "MLX triad on the device"


_DEVICE_COPY: dict = {}


def torch_copy_bandwidth(
    device: str, n: int = 1 << 26, reps: int = 15
) -> tuple[float, str]:
    """Bytes per second of a device-to-device copy by PyTorch on ``device``
    (reads and writes 4 bytes per element)."""
    import torch

    if (device, n) not in _DEVICE_COPY:
        src = torch.ones(n, device=device)
        _DEVICE_COPY[device, n] = (src, torch.empty_like(src))
    src, dst = _DEVICE_COPY[device, n]
    sync = torch_sync(device)

    def run():
        dst.copy_(src)
        sync()

    return 8 * n / median_seconds(run, reps), f"PyTorch copy on {device}"


def device_bandwidth(device: str, peer: str | None, reps: int = 15):
    """The bandwidth the roofline assumes (bytes per second) and how it was
    measured: on the CPU an in-place triad (C, all cores) over buffers MLX
    allocated, the memory the optimizer works on; on a GPU the
    faster of MLX's triad on it and, where PyTorch has that GPU (``peer``),
    PyTorch's device-to-device copy."""
    if device == "cpu":
        return triad_bandwidth(reps=reps)
    found = [mlx_triad_bandwidth(reps=reps)]
    if peer is not None:
        found.append(torch_copy_bandwidth(peer, reps=reps))
    return max(found)


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
    "fused_contiguous": "fused, contig. g",
    "eval_floor": "MLX eval floor",
    "fused_clip": "fused +clip",
    "stock_clip": "stock +clip",
    "fused_grad_scale": "fused +scale",
    "stock_grad_scale": "stock +scale",
    "roofline": "roofline",
}


# One color per implementation in both panels (stock eager is orange in the
# optimizer step and in the training step).
COLORS = {
    "fused": "C0",
    "fused_eager": "C0",
    "fused_compiled": "#08306b",
    "stock_eager": "C1",
    "stock_compiled": "C2",
    "torch_foreach": "C3",
    "torch_fused": "C4",
}

TRAIN_IMPLS = ["stock_eager", "fused_eager", "stock_compiled", "fused_compiled"]
TRAIN_LABELS = {
    "stock_eager": "stock eager",
    "fused_eager": "fused eager",
    "stock_compiled": "stock compiled",
    "fused_compiled": "fused compiled",
}


def make_optimizer(fused: bool):
    if fused:
        return mfs.FusedSGD(mfs.step_decay(*SCHEDULE), **HYPER)
    return optim.SGD(optim.step_decay(*SCHEDULE), **HYPER)


def train_runner(kind: str, name: str, dtype):
    """One training step (forward, backward, update) of real workload
    ``name`` on a fixed batch; ``*_compiled`` in MLX's idiom,
    ``partial(mx.compile, inputs=state, outputs=state)``. For the mlx-lm
    workloads this is the step ``mlx_lm.tuner.trainer.train`` compiles, from
    the same parts: its loss and batches, ``optimizer.update(model, grad)``,
    and its state list (the random state included); ``train`` itself builds
    and compiles its step anew on every call, so it cannot be timed step by
    step."""
    w, batch = real_model(name, dtype)
    opt = make_optimizer(kind.startswith("fused"))
    opt.init(w.model.trainable_parameters())
    mx.eval(opt.state)
    loss_and_grad = nn.value_and_grad(w.model, w.loss)

    def train_step(*b):
        loss, grads = loss_and_grad(w.model, *b)
        opt.update(w.model, grads)
        return loss

    state = [w.model.state, opt.state, *getattr(w, "extra_state", [])]
    if kind.endswith("compiled"):
        train_step = partial(mx.compile, inputs=state, outputs=state)(train_step)

    def step():
        loss = train_step(*batch)
        mx.eval(loss, state)

    return step, mx.synchronize


def main(argv=None) -> int:
    all_workloads = [*REAL_WORKLOADS, *SYNTHETIC_WORKLOADS]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    skipped = GPU_WORKLOADS + ([] if have_mlx_lm() else MLX_LM_WORKLOADS)
    ap.add_argument(
        "--workloads",
        nargs="+",
        default=[w for w in all_workloads if w not in skipped],
        choices=all_workloads,
        help="default: all but " + " and ".join(GPU_WORKLOADS) + " (1B parameters, "
        "for a GPU with about 80 GB)",
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument(
        "--dtype", default="float32", choices=["float32", "float16", "bfloat16"]
    )
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    ap.add_argument(
        "--reps", type=int, default=4, help="timed steps per implementation per round"
    )
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS + EXTRA_IMPLS)
    ap.add_argument(
        "--no-training",
        action="store_true",
        help="skip the training-step table of the real models",
    )
    ap.add_argument(
        "--out", default=str(HERE / "results"), help="folder for JSON and PNG"
    )
    args = ap.parse_args(argv)
    if not have_mlx_lm() and set(args.workloads) & set(MLX_LM_WORKLOADS):
        ap.error("the llama workloads need mlx-lm: pip install '.[bench]'")
    if not have_mlx_lm():
        print("mlx-lm is not installed: the llama rows are left out.", file=sys.stderr)

    device = mx.gpu if args.device == "gpu" else mx.cpu
    cuda = getattr(mx, "cuda", None)
    if args.device == "gpu" and not (
        mx.metal.is_available() or (cuda is not None and cuda.is_available())
    ):
        ap.error("--device gpu needs MLX with a GPU backend (Metal, or CUDA)")
    mx.set_default_device(device)
    dtype = getattr(mx, args.dtype)
    try:
        import torch  # noqa: F401

        have_torch = True
    except ImportError:
        have_torch = False
    peer = torch_device(args.device) if have_torch else None
    impls = [i for i in args.impls if peer is not None or not i.startswith("torch")]
    if have_torch and peer is None:
        print("PyTorch has no GPU here: its rows are left out.", file=sys.stderr)
    # The option rows compare with stock ops on flat trees: synthetic only.
    real_impls = [i for i in impls if i in IMPLS]
    real = [w for w in args.workloads if w in REAL_WORKLOADS]
    synthetic = [w for w in args.workloads if w in SYNTHETIC_WORKLOADS]

    bw, bw_how = device_bandwidth(args.device, peer)
    results = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "mlx": mx.__version__,
            "torch": __import__("torch").__version__ if have_torch else None,
            "torch_device": peer,
            "device": args.device,
            "device_name": mx.device_info(device).get("device_name"),
            "dtype": args.dtype,
            "bandwidth_GBps": bw / 1e9,
            "bandwidth_method": bw_how,
            # For reference: the same triad over NumPy's memory (2 MiB pages
            # where Linux grants them; see triad_buffers).
            "bandwidth_numpy_GBps": (
                triad_bandwidth(memory="numpy")[0] / 1e9
                if args.device == "cpu"
                else None
            ),
        },
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "method": (
            f"{args.rounds} interleaved rounds x {args.reps} steps (each turn "
            f"after {RESUME_S * 1e3:.0f} ms of untimed steps) after {args.warmup} "
            "warm-up steps; "
            "medians, min and max of the round medians"
        ),
        "workloads": {},
        "training": {},
    }
    units = (len(real) * (1 + (not args.no_training)) + len(synthetic)) * args.rounds
    progress = Progress(units)
    bytes_per_param = BYTES_PER_PARAM * dtype.size / 4
    for wl in args.workloads:
        if wl in REAL_WORKLOADS:
            w, _, grads = real_workload(wl, dtype)
            params = w.model.trainable_parameters()
            wl_impls = real_impls
            row = {"kind": "real", "description": REAL_WORKLOADS[wl][1]}
            row["not_row_contiguous"] = not_row_contiguous(grads)
        else:
            shapes = workload_shapes(wl)
            params = make_tree(shapes, dtype, 0)
            grads = make_tree(shapes, dtype, 1)
            wl_impls = impls
            row = {"kind": "synthetic", "description": "contiguous random gradients"}
        leaves = [p for _, p in tree_flatten(params)]
        shapes = [tuple(p.shape) for p in leaves]
        row["tensors"] = len(leaves)
        row["params"] = sum(p.size for p in leaves)
        runners = {}
        for impl in list(wl_impls):
            if not impl.startswith("torch"):
                runners[impl] = mlx_runner(impl, params, grads)
                continue
            try:
                runners[impl] = torch_runner(impl, shapes, peer)
                step, sync = runners[impl]
                step()
                sync()
            except (RuntimeError, NotImplementedError) as e:
                # A PyTorch build whose fused/foreach SGD does not run on
                # this device: say so and leave the row out of every table.
                print(f"{LABELS[impl]} on {peer} failed: {e}", file=sys.stderr)
                runners.pop(impl, None)
                for names in (impls, real_impls):
                    if impl in names:
                        names.remove(impl)
        if takes_apart(wl) and "fused" in runners:
            contiguous = tree_map(mx.contiguous, grads)
            mx.eval(contiguous)
            runners["fused_contiguous"] = mlx_runner("fused", params, contiguous)
            runners["eval_floor"] = eval_floor_runner()
        rounds = measure_rounds(
            runners,
            args.rounds,
            args.reps,
            args.warmup,
            progress,
            f"{wl}: optimizer step",
            bytes_per_param * row["params"],
            lambda: device_bandwidth(args.device, peer, reps=3)[0],
        )
        summarize(rounds, row)
        results["workloads"][wl] = row
        del runners
        release_torch(peer)
        if wl in REAL_WORKLOADS and not args.no_training:
            train = {}
            trainers = {k: train_runner(k, wl, dtype) for k in TRAIN_IMPLS}
            summarize(
                measure_rounds(
                    trainers,
                    args.rounds,
                    1,
                    1,
                    progress,
                    f"{wl}: training step",
                ),
                train,
            )
            results["training"][wl] = train
            del trainers

    print_tables(results, impls)
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


def _ms(row: dict, name: str) -> float:
    return row.get(name + "_ms", float("nan"))


def _step_table(results, names, impls, title) -> None:
    cols = ["roofline", *impls]
    real = any(results["workloads"][w]["kind"] == "real" for w in names)
    print(f"\n{title}")
    grads = f" {'strided':>7}" if real else ""
    head = f"{'workload':<10} {'tensors':>7} {'params':>8}{grads} | " + " ".join(
        f"{LABELS[c]:>16}" for c in cols
    )
    print(head + f" | {'fused/roofline':>14} {'eager/fused':>11}")
    print("-" * len(head) + "-" * 29)
    # Ratios within each round, then their median (paired_ratio).
    for wl in names:
        row = results["workloads"][wl]
        cells = " ".join(f"{_ms(row, c):>13.2f} ms" for c in cols)
        sizes = f"{wl:<10} {row['tensors']:>7} {row['params'] / 1e6:>7.1f}M"
        if real:
            sizes += f" {row['not_row_contiguous']:>3}/{row['tensors']:<3}"
        ratios = (
            f"{_ratio(paired_ratio(row, 'fused', 'roofline'), 14, 2)} "
            f"{_ratio(paired_ratio(row, 'stock_eager', 'fused'), 11, 1)}"
        )
        print(f"{sizes} | {cells} | {ratios}")


def _breakdown_table(results, names) -> None:
    """Where the fused step's time goes on the real models, from the same
    rounds: the gradients' layouts (the same values made row-contiguous),
    the contiguous step against the roofline, MLX's eval floor, and how far
    stock eager is from the roofline."""
    if not names:
        return
    cols = ["roofline", "fused", "fused_contiguous", "eval_floor"]
    print(
        "\nThe fused step taken apart (real models, same rounds): "
        "layout = fused / fused on contiguous copies of the same gradients"
    )
    head = f"{'workload':<10} | " + " ".join(f"{LABELS.get(c, c):>16}" for c in cols)
    print(head + f" | {'layout':>7} {'contig/roofline':>15} {'eager/roofline':>14}")
    print("-" * len(head) + "-" * 41)
    for wl in names:
        row = results["workloads"][wl]
        cells = " ".join(f"{_ms(row, c):>13.2f} ms" for c in cols)
        ratios = (
            f"{_ratio(paired_ratio(row, 'fused', 'fused_contiguous'), 7, 2)} "
            f"{_ratio(paired_ratio(row, 'fused_contiguous', 'roofline'), 15, 2)} "
            f"{_ratio(paired_ratio(row, 'stock_eager', 'roofline'), 14, 1)}"
        )
        print(f"{wl:<10} | {cells} | {ratios}")
    print(
        "  MLX eval floor: evaluating one scalar op, the least any step takes; "
        "eager/roofline: stock eager's step over the roofline, the most a step "
        "at the roofline could gain on it"
    )


def _warnings(results) -> list[str]:
    """Spread past SPREAD_WARNING, or a step faster than the roofline."""
    out = []
    rows = [(f"{w} optimizer step", r, LABELS) for w, r in results["workloads"].items()]
    rows += [
        (f"{w} training step", r, TRAIN_LABELS) for w, r in results["training"].items()
    ]
    for where, row, labels in rows:
        # What summarize() wrote (each has a range), but the eval floor: a
        # reference of tens of microseconds, faster than the roofline by
        # design, whose spread says nothing the others do not.
        names = [k[: -len("_range_ms")] for k in row if k.endswith("_range_ms")]
        names = [n for n in names if n != "eval_floor"]
        for name in names:
            lo, hi = row[f"{name}_range_ms"]
            median = row[f"{name}_ms"]
            if (hi - lo) / median > SPREAD_WARNING:
                out.append(
                    f"{where}, {labels.get(name, name)}: "
                    f"round medians {lo:.2f} to {hi:.2f} ms "
                    f"({(hi - lo) / median:.0%} spread)"
                )
        roof = row.get("roofline_ms")
        for name in names:
            value = row[f"{name}_ms"]
            if roof and name != "roofline" and value < roof:
                out.append(
                    f"{where}, {labels.get(name, name)}: {value:.2f} ms "
                    f"beats the roofline {roof:.2f} ms"
                )
    return out


def print_tables(results, impls) -> None:
    m = results["machine"]
    print(
        f"\n{m['platform']}, {m['cpus']} CPUs, MLX {m['mlx']}, torch {m['torch']}"
        f"{' on ' + m['torch_device'] if m['torch_device'] else ''}, "
        f"device {m['device']} ({m['device_name']}), {m['dtype']}"
    )
    print(
        f"roofline bandwidth {m['bandwidth_GBps']:.1f} GB/s "
        f"({m['bandwidth_method']}"
        + (
            f"; over NumPy's buffers {m['bandwidth_numpy_GBps']:.1f} GB/s"
            if m.get("bandwidth_numpy_GBps")
            else ""
        )
        + "); "
        f"{results['method']}"
    )
    wls = results["workloads"]
    real = [w for w in wls if wls[w]["kind"] == "real"]
    synthetic = [w for w in wls if wls[w]["kind"] == "synthetic"]
    if real:
        _step_table(
            results,
            real,
            [i for i in impls if i in IMPLS],
            "Optimizer step, real models (gradients from nn.value_and_grad; "
            "'strided': gradients that are not row-contiguous; torch: the same "
            "shapes, PyTorch's contiguous gradients)",
        )
        for w in real:
            print(f"  {w}: {wls[w]['description']}")
        _breakdown_table(results, [w for w in real if "fused_contiguous_ms" in wls[w]])
    if results["training"]:
        print(
            "\nTraining step, real models (forward + backward + update; compiled: "
            "partial(mx.compile, inputs=state, outputs=state))"
        )
        head = f"{'workload':<10} | " + " ".join(
            f"{TRAIN_LABELS[c]:>16}" for c in TRAIN_IMPLS
        )
        print(
            head + f" | {'fused/stock':>11} {'compiled f/s':>12} "
            f"{'opt share stock':>15} {'fused':>6}"
        )
        print("-" * (len(head) + 51))
        for wl, row in results["training"].items():
            cells = " ".join(f"{_ms(row, c):>13.2f} ms" for c in TRAIN_IMPLS)
            opt = wls[wl]
            share_stock = _ms(opt, "stock_eager") / _ms(row, "stock_eager")
            share_fused = _ms(opt, "fused") / _ms(row, "fused_eager")
            ratio = paired_ratio(row, "fused_eager", "stock_eager")
            compiled = paired_ratio(row, "fused_compiled", "stock_compiled")
            print(
                f"{wl:<10} | {cells} | {_ratio(ratio, 11, 2)} "
                f"{_ratio(compiled, 12, 2)} {share_stock:>15.0%} {share_fused:>6.0%}"
            )
    if synthetic:
        _step_table(
            results,
            synthetic,
            impls,
            "Optimizer step, synthetic workloads (contiguous random gradients)",
        )
    warnings = _warnings(results)
    if warnings:
        print("\nWARNING: the machine was busy during this run; compare with care:")
        for line in warnings:
            print(f"  {line}")


def _bars(ax, groups, series, values, labels, roofline=False, log=True) -> None:
    """Grouped bars with their values printed on them; the roofline as a
    dashed line across each group; a legend below the axes."""
    width = 0.8 / len(series)
    x = np.arange(len(groups))
    for j, name in enumerate(series):
        heights = [values[g].get(name + "_ms", np.nan) for g in groups]
        bars = ax.bar(
            x + j * width, heights, width, label=labels[name], color=COLORS.get(name)
        )
        for bar, h in zip(bars, heights):
            if np.isfinite(h):
                ax.annotate(
                    f"{h:.3g}",
                    (bar.get_x() + bar.get_width() / 2, h),
                    ha="center",
                    va="bottom",
                    fontsize=6,
                    rotation=90,
                    xytext=(0, 2),
                    textcoords="offset points",
                )
    if roofline:
        for i, g in enumerate(groups):
            y = values[g].get("roofline_ms")
            if y:
                ax.hlines(
                    y,
                    x[i] - width / 2,
                    x[i] + width * (len(series) - 0.5),
                    colors="k",
                    linestyles="--",
                    linewidth=1,
                    label="memory roofline" if i == 0 else None,
                )
    ax.set_xticks(x + width * (len(series) - 1) / 2, groups)
    if log:
        from matplotlib.ticker import FuncFormatter, LogLocator

        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_ylabel("ms per step (log scale)")
    else:
        ax.set_ylabel("ms per step")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(
        fontsize=7,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.08),
        ncol=min(len(series) + bool(roofline), 4),
        frameon=False,
    )


def plot(results, impls, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    wls = results["workloads"]
    panels = 2 if results["training"] else 1
    fig, axes = plt.subplots(
        1, panels, figsize=(14 if panels == 2 else 9, 5.5), squeeze=False
    )
    ax = axes[0][0]
    _bars(ax, list(wls), impls, wls, LABELS, roofline=True)
    m = results["machine"]
    ax.set_title(
        f"Optimizer step, {m['dtype']} on {m['device']} "
        f"({m['cpus']} CPUs, MLX {m['mlx']})",
        fontsize=10,
    )
    if panels == 2:
        ax = axes[0][1]
        train = results["training"]
        _bars(ax, list(train), TRAIN_IMPLS, train, TRAIN_LABELS, log=False)
        ax.set_title("Training step (forward + backward + update)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
