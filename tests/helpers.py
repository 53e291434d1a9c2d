"""Helpers the test files share (fixtures and hooks are conftest.py's)."""

import ctypes
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
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
    return functional.apply_update(
        params,
        grads,
        velocities,
        functional.sgd_settings(grads, **options),
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


class MLP(nn.Module):
    """Nested layers: a list of Linear, a LayerNorm and a dict of heads."""

    def __init__(self):
        super().__init__()
        self.layers = [nn.Linear(8, 32), nn.Linear(32, 32)]
        self.norm = nn.LayerNorm(32)
        self.heads = {"out": nn.Linear(32, 3), "aux": nn.Linear(32, 1)}

    def __call__(self, x):
        for layer in self.layers:
            x = nn.relu(layer(x))
        x = self.norm(x)
        return self.heads["out"](x), self.heads["aux"](x)


def mlp_loss(model, x, y, z):
    out, aux = model(x)
    return nn.losses.cross_entropy(out, y, reduction="mean") + mx.mean(
        (aux.squeeze(-1) - z) ** 2
    )


def train_steps(model, optimizer, steps, key, transform=None):
    """`steps` training steps on generated data drawn from `key`; the
    gradients pass through `transform` first when one is given."""
    loss_and_grad = nn.value_and_grad(model, mlp_loss)
    for _ in range(steps):
        key, k1, k2, k3 = mx.random.split(key, 4)
        x = mx.random.normal((16, 8), key=k1)
        y = mx.random.randint(0, 3, (16,), key=k2)
        z = mx.random.normal((16,), key=k3)
        _, grads = loss_and_grad(model, x, y, z)
        optimizer.update(model, transform(grads) if transform else grads)
        mx.eval(model.parameters(), optimizer.state)


# ---------------------------------------------------------------------------
# The GPU kernels' host harnesses (tests/test_metal_harness.py and
# tests/test_cuda_harness.py): their variants, inputs and buffers.
# ---------------------------------------------------------------------------

VARIANTS = [
    dict(momentum=0.0, weight_decay=0.0, dampening=0.0, nesterov=False),
    dict(momentum=0.0, weight_decay=0.01, dampening=0.0, nesterov=False),
    dict(momentum=0.9, weight_decay=0.0, dampening=0.0, nesterov=False),
    dict(momentum=0.9, weight_decay=0.01, dampening=0.0, nesterov=False),
    dict(momentum=0.7, weight_decay=0.0, dampening=0.25, nesterov=False),
    dict(momentum=0.7, weight_decay=0.02, dampening=0.25, nesterov=False),
    dict(momentum=0.9, weight_decay=0.0, dampening=0.0, nesterov=True),
    dict(momentum=0.9, weight_decay=0.003, dampening=0.0, nesterov=True),
    dict(momentum=0.0, weight_decay=0.01, dampening=0.0, nesterov=False, maximize=True),
    dict(
        momentum=0.9, weight_decay=0.0, dampening=0.0, nesterov=False, grad_scale=1024.0
    ),
    dict(
        momentum=0.7,
        weight_decay=0.02,
        dampening=0.25,
        nesterov=False,
        maximize=True,
        grad_scale=3.0,
    ),
    dict(
        momentum=0.9,
        weight_decay=0.003,
        dampening=0.0,
        nesterov=True,
        grad_scale=65536.0,
    ),
]


def cfg_id(c):
    clip = c.get("clip_factor")
    extra = f"-max{int(c.get('maximize', False))}-s{c.get('grad_scale')}"
    extra += f"-c{clip.item() if clip is not None else None}"
    return f"m{c['momentum']}-wd{c['weight_decay']}-d{c['dampening']}-n{int(c['nesterov'])}{extra}"


def host_bits(a: mx.array) -> np.ndarray:
    """The array's elements as a contiguous NumPy buffer of the same bits."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.array(a))


def host_ptr(x: np.ndarray):
    return x.ctypes.data_as(ctypes.c_void_p)


# Sentinel bytes around the tensors the kernel harnesses hand the kernels. A
# kernel that strays past its tensor (on a GPU a fault, or a neighbour's data
# silently overwritten) then reads memory the test owns, and what it writes
# there is caught by assert_in_bounds; past a bare NumPy buffer it would be
# undefined behaviour on the host's heap, which once hung a mutant's check
# in CI instead of failing it. 16 KiB: a CUDA chunk of float32 each side.
GUARD_BYTES = 16384
SENTINEL = 0xA5


def guarded(x: np.ndarray, misaligned: bool = False) -> np.ndarray:
    """A copy of ``x`` with GUARD_BYTES of sentinel bytes each side, starting
    on a 16-byte boundary or, ``misaligned``, one element past one (a CUDA
    kernel must then take its scalar path)."""
    x = np.ascontiguousarray(x)
    raw = np.full(x.nbytes + 2 * GUARD_BYTES + 32, SENTINEL, np.uint8)
    start = GUARD_BYTES + (-raw.ctypes.data) % 16 + (x.itemsize if misaligned else 0)
    out = raw[start : start + x.nbytes].view(x.dtype).reshape(x.shape)
    out[...] = x
    return out


def assert_in_bounds(buffers, what: str) -> None:
    """Every ``guarded`` buffer's sentinel bytes are intact: nothing wrote
    outside the tensor."""
    for i, x in enumerate(buffers):
        raw = x.base
        assert raw is not None and raw.dtype == np.uint8, "not a guarded buffer"
        start = x.ctypes.data - raw.ctypes.data
        outside = np.concatenate([raw[:start], raw[start + x.nbytes :]])
        wrote = np.flatnonzero(outside != SENTINEL)
        if wrote.size:
            first = int(wrote[0]) - start
            first += x.nbytes if first >= 0 else 0  # past the end
            raise AssertionError(
                f"the kernel wrote outside {what} of tensor {i}: {wrote.size} "
                f"bytes, the first {first} from the tensor's first byte"
            )


def buffer_ptr(x):
    """Address of element 0 of a buffer, or of a strided view's first element
    inside its base buffer (so that negative strides stay in bounds)."""
    if isinstance(x, Strided):
        return ctypes.c_void_p(x.buffer.ctypes.data + x.offset * x.buffer.itemsize)
    return host_ptr(x)


class Strided:
    """A non-contiguous view: a base buffer, a shape and element strides."""

    def __init__(self, base: mx.array, view):
        self.base = base
        self.array = view(base)
        nb = guarded(host_bits(base))
        self.buffer = nb
        # Element strides of the view over the base buffer, from NumPy.
        nview = view(nb)
        self.strides = np.array([s // nb.itemsize for s in nview.strides], np.int64)
        self.offset = (
            nview.__array_interface__["data"][0] - nb.ctypes.data
        ) // nb.itemsize


# The host buffer type holding each MLX dtype's bits (bfloat16 as uint16).
HOST_DTYPE = {mx.float32: np.float32, mx.float16: np.float16, mx.bfloat16: np.uint16}


def broadcast_view(shape):
    def view(a):
        return (np if isinstance(a, np.ndarray) else mx).broadcast_to(a, shape)

    return view


# Layouts for the general kernels: the logical shape, then for param, grad
# and momentum buffer either None (row-contiguous) or (base shape, view).
# The rows of a layout are cut into bands of kRowsPerThread (8) with a
# remainder; the planner moves a transposed operand's contiguous axis to the
# rows.
GENERAL_LAYOUTS = {
    "transposed_grad": ((19, 13), None, ((13, 19), lambda a: a.T), None),
    "all_transposed_negative_strides": (
        (6, 5),
        ((5, 6), lambda a: a.T),
        ((5, 6), lambda a: a[::-1].T),
        ((5, 6), lambda a: a.T),
    ),
    "batched_transposed_grad": (
        (3, 11, 17),
        None,
        ((3, 17, 11), lambda a: a.swapaxes(1, 2)),
        None,
    ),
    "transposed_leading_axis": (
        (4, 9, 6),
        None,
        ((9, 4, 6), lambda a: a.transpose(1, 0, 2)),
        ((9, 4, 6), lambda a: a.transpose(1, 0, 2)),
    ),
    "permuted_4d": (
        (2, 3, 4, 5),
        None,
        ((4, 3, 5, 2), lambda a: a.transpose(3, 1, 0, 2)),
        None,
    ),
    "sliced_step": (
        (9, 13),
        ((9, 40), lambda a: a[:, 1::3]),
        ((9, 40), lambda a: a[:, ::3][:, :13]),
        None,
    ),
    "broadcast_row_grad": ((9, 13), None, ((13,), broadcast_view((9, 13))), None),
    "broadcast_column_grad": ((9, 13), None, ((9, 1), broadcast_view((9, 13))), None),
    "size_one_axes": (
        (1, 5, 1, 7),
        None,
        ((1, 7, 1, 5), lambda a: a.swapaxes(1, 3)),
        ((1, 7, 1, 5), lambda a: a.swapaxes(1, 3)),
    ),
}


def general_operands(layout, dtypes, seed):
    """param, grad and momentum buffer for a GENERAL_LAYOUTS entry, each of
    its dtype: arrays, or Strided views."""
    shape, *specs = GENERAL_LAYOUTS[layout]
    out = []
    for k, (spec, dtype) in enumerate(zip(specs, dtypes)):
        base_shape, view = spec if spec is not None else (shape, None)
        base = mx.random.normal(base_shape, key=mx.random.key(seed + k)).astype(dtype)
        out.append(base if view is None else Strided(base, view))
    for x in out:
        assert (x.array if isinstance(x, Strided) else x).shape == shape
    assert any(isinstance(x, Strided) for x in out)
    return out


def arrays_of(operands):
    return [x.array if isinstance(x, Strided) else x for x in operands]


def norm_in_both_orders(set_reverse, read):
    """The norm read() gives with the grids' threadgroups (blocks) run first
    to last, after checking that run last to first (set_reverse(1)) it has
    the same bits."""
    try:
        set_reverse(0)
        forward = read()
        set_reverse(1)
        backward = read()
    finally:
        set_reverse(0)
    assert forward.view(np.uint32) == backward.view(np.uint32), (
        f"the norm's bits depend on the order: {forward!r} first to last, "
        f"{backward!r} last to first"
    )
    return forward
