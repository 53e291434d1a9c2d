import os
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_fused_sgd as mfs


def to_numpy(a: mx.array) -> np.ndarray:
    """Exact host copy (bfloat16 widened to float32, which is exact)."""
    if a.dtype == mx.bfloat16:
        a = a.astype(mx.float32)
    return np.array(a)


def sgd_reference(p, g, v, lr, momentum, weight_decay, dampening, nesterov):
    """The formulas of docs/design.md, in the precision of the NumPy inputs (float64
    in the tests)."""
    g = g + weight_decay * p
    if momentum <= 0:
        return p - lr * g, v
    v = momentum * v + ((1 - dampening) * g if dampening > 0 else g)
    u = g + momentum * v if nesterov else v
    return p - lr * u, v


# On the GPU too the comparison is exact (0 ulp): the kernels and stock's
# Metal ops are both compiled without fast math (no contraction, the precise
# pow), so the same float32 operations in the same order give the same bits.
# Only the gradient norm keeps a tolerance against the CPU and stock (the GPU
# sums float32 partials, the CPU in double; tests/test_clipping.py), though
# on each device it has the same bits every time.
# Every test runs on the CPU and, where MLX has a GPU (Metal, or MLX's CUDA
# build), on the GPU; MFS_TEST_DEVICES=cpu (or gpu) restricts them (CI's
# hosted Macs: a paravirtual GPU that cannot stand for Apple silicon).
DEVICES = (
    os.environ["MFS_TEST_DEVICES"].split(",")
    if os.environ.get("MFS_TEST_DEVICES")
    else ["cpu"] + (["gpu"] if mx.is_available(mx.gpu) else [])
)


def pyproject() -> dict:
    """The repository's pyproject.toml, parsed (the test is skipped where
    Python has no tomllib: 3.10)."""
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads(
        (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    )


def small_llama(vocab: int = 64, seed: int = 0):
    """A small mlx-lm Llama with random weights (no download): the
    ecosystem's most used architecture, which keeps `layer_types`, a list
    of strings, on its inner model."""
    from mlx_lm.models import llama

    mx.random.seed(seed)
    model = llama.Model(
        llama.ModelArgs(
            model_type="llama",
            hidden_size=64,
            num_hidden_layers=2,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            vocab_size=vocab,
        )
    )
    mx.eval(model.parameters())
    return model


def sgd_fallback(
    params,
    grads,
    velocities,
    *,
    learning_rate=None,
    step=None,
    init=0.0,
    decay_rate=1.0,
    step_size=1,
    stream=None,
    **options,
):
    """The update composed of stock MLX ops (what GPU streams run in a build
    without GPU kernels), on any device: the learning rate, or the step-decay
    schedule (init, decay_rate, step_size) of ``step``; ``options`` are the
    update functions' keywords. Returns (params, velocities, masters)."""
    from mlx_fused_sgd import functional

    schedule = None if step is None else mfs.step_decay(init, decay_rate, step_size)
    return functional.run(
        params,
        grads,
        velocities,
        functional.settings(grads, **options),
        learning_rate=learning_rate,
        step=step,
        schedule=schedule,
        fallback=True,
        stream=stream,
    )


def assert_bitwise_equal(a: mx.array, b: mx.array, what: str = "") -> None:
    """Same dtype, same shape and the same bits in every element, on every
    device."""
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    na, nb = to_numpy(a), to_numpy(b)
    bits = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[na.itemsize]
    ba, bb = na.view(bits).reshape(-1), nb.view(bits).reshape(-1)
    diff = np.flatnonzero(ba != bb)
    assert diff.size == 0, (
        f"{what}: {diff.size} of {na.size} elements differ, first at flat "
        f"index {diff[0]}: {na.flat[diff[0]]!r} vs {nb.flat[diff[0]]!r}"
    )


@pytest.fixture(autouse=True, params=DEVICES)
def device(request):
    """Every test runs on the CPU, and again on the GPU where MLX has one
    (Apple silicon, or an NVIDIA GPU with MLX's CUDA build): the default
    device is set for the test's duration."""
    prev = mx.default_device()
    mx.set_default_device(mx.gpu if request.param == "gpu" else mx.cpu)
    yield request.param
    mx.set_default_device(prev)


def compile_harness(
    source: Path, include_dirs: list[Path], lib: Path, optimize: str = "-O1"
) -> Path:
    """Compile a host model of GPU kernels (tests/metal_harness.cpp,
    tests/cuda_harness.cpp) into the shared library ``lib``, with the
    arithmetic flags of the CPU kernels (no FMA contraction). Mutants,
    compiled once and run briefly, take ``-O0`` (half the compile time)."""
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.fail(f"no C++ compiler to build {source.name} with")
    cmd = [
        cxx,
        "-std=c++20",
        optimize,
        "-fPIC",
        "-shared",
        "-Wno-attributes",
        "-ffp-contract=off",
        *[f"-I{d}" for d in include_dirs],
        str(source),
        "-o",
        str(lib),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return lib
