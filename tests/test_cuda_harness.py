"""The CUDA kernels, verified on a machine without a GPU.

``kernels/*.cuh`` are compiled as C++ with the system compiler against
``tests/cuda_shim/cuda_shim.h`` (a stand-in for the CUDA runtime) and
``tests/cuda_harness.cpp`` launches them as ``eval_gpu`` does: the same
multi-tensor tables, chunks, kernel dispatch and strided layouts (all from
``kernels/cuda_launch.h`` and ``kernels/cuda_dispatch.h``), every block's
threads run as fibers that meet in ``__shfl_down_sync`` and
``__syncthreads``. The outputs are compared bit for bit with this package's
CPU primitives, which are bit-identical to stock MLX. What this cannot show:
nvcc's code generation and CUDA's ``powf`` on a real GPU (the GPU test run
does; ``test_cuda_build.py`` checks the PTX for fused multiply-adds), nor the
launch code in ``csrc/cuda/`` itself (``nvcc`` compiles it in
``test_cuda_build.py``).
"""

import ctypes
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_fused_sgd as mfs

from helpers import (
    GENERAL_LAYOUTS,
    HOST_DTYPE,
    SENTINEL,
    VARIANTS,
    Strided,
    arrays_of,
    assert_bitwise_equal,
    assert_in_bounds,
    buffer_ptr,
    cfg_id,
    compile_harness,
    general_operands,
    guarded,
    host_bits,
    host_ptr,
    norm_in_both_orders,
)

# Once, on the CPU: the host harness runs the kernels on the CPU, against the CPU primitives.
pytestmark = pytest.mark.devices("cpu")


ROOT = Path(__file__).resolve().parents[1]
SHIM = ROOT / "tests" / "cuda_shim"
HARNESS = ROOT / "tests" / "cuda_harness.cpp"
DTYPE_CODES = {mx.float32: 0, mx.float16: 1, mx.bfloat16: 2}
ROUNDING = {"nearest": 0, "stochastic": 1, "master": 2}
CHUNK = 4096  # cuda_launch::kChunk
MAX_TENSORS = 32  # cuda_launch::kMaxTensors

P = ctypes.c_void_p


class Variant(ctypes.Structure):
    """tests/cuda_harness.cpp's Variant: dtypes, variant and schedule."""

    _fields_ = [
        ("dtype", ctypes.c_int32),
        ("state_dtype", ctypes.c_int32),
        ("momentum", ctypes.c_double),
        ("weight_decay", ctypes.c_double),
        ("dampening", ctypes.c_double),
        ("nesterov", ctypes.c_int32),
        ("maximize", ctypes.c_int32),
        ("scaled", ctypes.c_int32),
        ("has_skip", ctypes.c_int32),
        ("has_clip", ctypes.c_int32),
        ("scheduled", ctypes.c_int32),
        ("init", ctypes.c_double),
        ("decay_rate", ctypes.c_double),
        ("step_size", ctypes.c_int64),
        ("rounding", ctypes.c_int32),
        ("seed", ctypes.c_uint64),
    ]


class Scalars(ctypes.Structure):
    """cuda_launch::SGDScalars: the device scalars of a launch."""

    _fields_ = [(name, P) for name in ("lr", "step", "scale", "skip", "clip", "rstep")]


def build_harness(
    out_dir: Path, kernels_root: Path = ROOT, optimize: str = "-O1"
) -> ctypes.CDLL:
    """Compile the harness with ``kernels/`` taken from ``kernels_root``."""
    return load_harness(
        compile_harness(
            HARNESS, [SHIM, kernels_root], out_dir / "cuda_harness.so", optimize
        )
    )


def load_harness(lib: Path) -> ctypes.CDLL:
    h = ctypes.CDLL(str(lib))
    h.run_sgd_multi.argtypes = [P, ctypes.c_int] + [P] * 10
    h.run_sgd_strided.argtypes = [P, ctypes.c_uint64, ctypes.c_int] + [P] * 10
    h.run_grad_read.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int] + [P] * 7
    h.run_grad_read.argtypes += [ctypes.c_float]
    h.set_reverse_blocks.argtypes = [ctypes.c_int]
    h.run_step_decay.argtypes = [
        P,
        P,
        ctypes.c_int64,
        ctypes.c_double,
        ctypes.c_double,
        ctypes.c_int64,
    ] + [ctypes.c_int, P, P]
    return h


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return build_harness(tmp_path_factory.mktemp("cuda"))


def _rounding(masters, rounding_seed) -> str:
    if masters is not None:
        return "master"
    return "stochastic" if rounding_seed is not None else "nearest"


def _variant(dtype, state_dtype, cfg, skip, schedule, rounding, seed) -> Variant:
    sched = schedule or mfs.step_decay(1.0, 1.0, 1)
    return Variant(
        DTYPE_CODES[dtype],
        DTYPE_CODES[state_dtype],
        cfg["momentum"],
        cfg["weight_decay"],
        cfg["dampening"],
        int(cfg["nesterov"]),
        int(cfg.get("maximize", False)),
        int(cfg.get("grad_scale") is not None),
        int(skip is not None),
        int(cfg.get("clip_factor") is not None),
        int(schedule is not None),
        float(sched.init),
        float(sched.decay_rate),
        sched.step_size,
        ROUNDING[rounding],
        seed or 0,
    )


def _scalars(cfg, lr, step, skip, rounding_step):
    """The device scalars (host buffers, kept alive by the caller) and the
    struct pointing at them."""
    scale = cfg.get("grad_scale")
    clip = cfg.get("clip_factor")
    buffers = [
        np.array([lr], np.float32),
        np.array([step or 0], np.uint64),
        np.array([scale if scale is not None else 1.0], np.float32),
        np.array([skip or 0], np.uint32),
        np.array([clip.item() if clip is not None else 1.0], np.float32),
        np.array([rounding_step], np.uint64),
    ]
    return buffers, Scalars(*[b.ctypes.data for b in buffers])


def _back(x: np.ndarray, shape, dtype):
    arr = mx.array(x.reshape(shape))
    return arr.view(mx.bfloat16) if dtype == mx.bfloat16 else arr


def cuda_sgd_many(
    h,
    params,
    grads,
    velocities,
    cfg,
    lr=0.0371,
    step=None,
    schedule=None,
    skip=None,
    masters=None,
    rounding_seed=None,
    rounding_step=0,
    misaligned=(),
):
    """One multi-tensor update, as eval_gpu launches it; returns the lists
    (params, velocities[, masters])."""
    dtype = params[0].dtype
    state_dtype = velocities[0].dtype if velocities else dtype

    # Tensors in `misaligned` start 1 element past a 16-byte boundary (the
    # kernel must take its scalar path); every one has guard bytes around it.
    def host(x, i):
        return guarded(x.reshape(-1), misaligned=i in misaligned)

    ins = [
        [host(host_bits(a), i) for i, a in enumerate(arrays)]
        for arrays in (params, grads, velocities or grads)
    ]
    m_in = [host(host_bits(a), i) for i, a in enumerate(masters)] if masters else None
    outs = [
        [host(np.zeros(p.size, out_dtype), i) for i, p in enumerate(params)]
        for out_dtype in (HOST_DTYPE[dtype], HOST_DTYPE[state_dtype], np.float32)
    ]
    n = len(params)

    def table(xs):
        return (P * n)(*[x.ctypes.data for x in xs])

    variant = _variant(
        dtype,
        state_dtype,
        cfg,
        skip,
        schedule,
        _rounding(masters, rounding_seed),
        rounding_seed,
    )
    keep, scalars = _scalars(cfg, lr, step, skip, rounding_step)
    rc = h.run_sgd_multi(
        ctypes.byref(variant),
        n,
        *[table(x) for x in ins],
        table(outs[0]),
        table(outs[1]),
        table(m_in) if m_in else None,
        table(outs[2]) if m_in else None,
        host_ptr(np.array([p.size for p in params], np.int64)),
        host_ptr(np.arange(n, dtype=np.uint64)),
        ctypes.byref(scalars),
    )
    assert rc == 0, f"run_sgd_multi returned {rc}"
    names = (
        "param",
        "grad",
        "momentum buffer",
        "param out",
        "momentum out",
        "master out",
    )
    for what, bufs in zip(names, ins + outs):
        assert_in_bounds(bufs, what)
    assert_in_bounds(m_in or [], "master")
    result = [
        [_back(o, p.shape, t) for o, p in zip(out, params)]
        for out, t in zip(outs, (dtype, state_dtype, mx.float32))
    ]
    return result if masters is not None else result[:2]


def cuda_sgd_strided(
    h,
    param,
    grad,
    velocity,
    cfg,
    lr=0.0371,
    master=None,
    rounding_seed=None,
    rounding_step=0,
    tensor_index=0,
    skip=None,
):
    """One strided update of one tensor (operands: arrays or Strided)."""
    ref = arrays_of([param])[0]
    shape, dtype = ref.shape, ref.dtype
    state_dtype = arrays_of([velocity])[0].dtype if velocity is not None else dtype
    bufs, strides = [], []
    for a in (param, grad, velocity, master):
        if a is None:
            bufs.append(None)
            strides.append(None)
        elif isinstance(a, Strided):
            bufs.append(a)
            strides.append(a.strides)
        else:
            bufs.append(host_bits(a).reshape(-1))
            st = np.ones(len(shape), np.int64)
            for d in range(len(shape) - 2, -1, -1):
                st[d] = st[d + 1] * shape[d + 1]
            strides.append(st)
    size = int(np.prod(shape)) if shape else 1
    outs = [
        guarded(np.zeros(size, t))
        for t in (HOST_DTYPE[dtype], HOST_DTYPE[state_dtype], np.float32)
    ]
    variant = _variant(
        dtype,
        state_dtype,
        cfg,
        skip,
        None,
        _rounding(master, rounding_seed),
        rounding_seed,
    )
    keep, scalars = _scalars(cfg, lr, None, skip, rounding_step)
    operand_strides = (P * 4)(
        *[s.ctypes.data if s is not None else None for s in strides]
    )
    rc = h.run_sgd_strided(
        ctypes.byref(variant),
        tensor_index,
        len(shape),
        host_ptr(np.array(shape, np.int64)),
        operand_strides,
        *[buffer_ptr(b) if b is not None else None for b in bufs[:3]],
        host_ptr(outs[0]),
        host_ptr(outs[1]),
        buffer_ptr(bufs[3]) if master is not None else None,
        host_ptr(outs[2]),
        ctypes.byref(scalars),
    )
    assert rc == 0, f"run_sgd_strided returned {rc}"
    for what, out in zip(("param out", "momentum out", "master out"), outs):
        assert_in_bounds([out], what)
    result = [
        _back(o, shape, t) for o, t in zip(outs, (dtype, state_dtype, mx.float32))
    ]
    return result if master is not None else result[:2]


# Sizes around the chunk (4096 elements a block) and the vector width, so
# that whole chunks take the vector path and tails the scalar one.
SIZES = [1, 5, 4095, 4096, 4097, 2 * CHUNK + 12, 1000]
DTYPES = [mx.float32, mx.float16, mx.bfloat16]


def _tensors(sizes, dtype, seed, state_dtype=None):
    def make(k):
        return [
            mx.random.normal((s,), key=mx.random.key(seed + 100 * k + i)).astype(
                state_dtype if (k == 2 and state_dtype is not None) else dtype
            )
            for i, s in enumerate(sizes)
        ]

    return make(0), make(1), make(2)


def _check_lists(got, expected, what):
    for i, (a, b) in enumerate(zip(got, expected)):
        assert_bitwise_equal(a, b, f"{what} of tensor {i} (size {a.size})")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", VARIANTS, ids=cfg_id)
def test_multi_tensor_kernel_matches_cpu(harness, dtype, cfg):
    ps, gs, vs = _tensors(SIZES, dtype, 1)
    # Tensor 1 and 3 misaligned: scalar loads for whole chunks too.
    got_p, got_v = cuda_sgd_many(harness, ps, gs, vs, cfg, misaligned=(1, 3))
    exp_p, exp_v = mfs.sgd_update_many(
        ps, gs, vs, learning_rate=mx.array(0.0371), **cfg
    )
    _check_lists(got_p, exp_p, "param")
    if cfg["momentum"] > 0:
        _check_lists(got_v, exp_v, "velocity")


def test_more_tensors_than_one_launch_holds(harness):
    """70 tensors: three launches of at most 32; empty tensors get no block."""
    sizes = [(7 * i) % 50 for i in range(2 * MAX_TENSORS + 6)]
    ps, gs, vs = _tensors(sizes, mx.float32, 3)
    cfg = VARIANTS[3]
    got_p, got_v = cuda_sgd_many(harness, ps, gs, vs, cfg)
    exp_p, exp_v = mfs.sgd_update_many(ps, gs, vs, learning_rate=0.0371, **cfg)
    _check_lists(got_p, exp_p, "param")
    _check_lists(got_v, exp_v, "velocity")


@pytest.mark.parametrize("step", [0, 9, 10, 25, 2**40 + 3])
def test_scheduled_multi_tensor_matches_cpu(harness, step):
    sched = mfs.step_decay(0.1, 0.9, 10)
    ps, gs, vs = _tensors([4096, 33], mx.float32, 5)
    cfg = VARIANTS[3]
    got_p, _ = cuda_sgd_many(harness, ps, gs, vs, cfg, step=step, schedule=sched)
    exp_p, _ = mfs.sgd_update_many_scheduled(
        ps, gs, vs, step=mx.array(step, mx.uint64), schedule=sched, **cfg
    )
    _check_lists(got_p, exp_p, "param")


@pytest.mark.parametrize("skip", [0, 1])
def test_skip_flag_matches_cpu(harness, skip):
    ps, gs, vs = _tensors([4096, 9], mx.float32, 7)
    cfg = VARIANTS[3]
    got_p, got_v = cuda_sgd_many(harness, ps, gs, vs, cfg, skip=skip)
    exp_p, exp_v = mfs.sgd_update_many(
        ps, gs, vs, learning_rate=0.0371, skip=mx.array(skip, mx.uint32), **cfg
    )
    _check_lists(got_p, exp_p, "param")
    _check_lists(got_v, exp_v, "velocity")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_float32_momentum_and_master_weights_match_cpu(harness, dtype):
    if dtype == mx.float32:
        pytest.skip("half params only")
    cfg = VARIANTS[5]
    ps, gs, vs = _tensors([4096, 4101, 3], dtype, 11, state_dtype=mx.float32)
    got_p, got_v = cuda_sgd_many(harness, ps, gs, vs, cfg)
    exp_p, exp_v = mfs.sgd_update_many(ps, gs, vs, learning_rate=0.0371, **cfg)
    _check_lists(got_p, exp_p, "param")
    _check_lists(got_v, exp_v, "velocity")
    ms = [p.astype(mx.float32) + 1e-3 for p in ps]
    got_p, got_v, got_m = cuda_sgd_many(harness, ps, gs, vs, cfg, masters=ms)
    exp_p, exp_v, exp_m = mfs.sgd_update_many(
        ps, gs, vs, learning_rate=0.0371, master_params=ms, **cfg
    )
    _check_lists(got_p, exp_p, "param")
    _check_lists(got_m, exp_m, "master")


def test_stochastic_rounding_streams_match_cpu(harness):
    """Each tensor of a launch rounds with its own stream (its place in the
    update), the vector path with each element's own index."""
    cfg = VARIANTS[3]
    seed, step = 2**40 + 17, 2**33 + 5
    ps, gs, vs = _tensors([4096, 37, 4096 + 5], mx.bfloat16, 13)
    got_p, _ = cuda_sgd_many(
        harness, ps, gs, vs, cfg, rounding_seed=seed, rounding_step=step
    )
    exp_p, _ = mfs.sgd_update_many(
        ps, gs, vs, learning_rate=0.0371, rounding_seed=seed, rounding_step=step, **cfg
    )
    _check_lists(got_p, exp_p, "param")


@pytest.mark.parametrize("cfg", [VARIANTS[0], VARIANTS[3], VARIANTS[7]], ids=cfg_id)
@pytest.mark.parametrize("layout", list(GENERAL_LAYOUTS))
def test_strided_kernel_matches_cpu(harness, cfg, layout):
    for dtype in DTYPES:
        p, g, v = general_operands(layout, [dtype] * 3, 21)
        got_p, got_v = cuda_sgd_strided(harness, p, g, v, cfg)
        exp_p, exp_v = mfs.sgd_update(
            *arrays_of([p, g, v]), learning_rate=mx.array(0.0371), **cfg
        )
        assert_bitwise_equal(got_p, exp_p, f"param, {dtype}")
        if cfg["momentum"] > 0:
            assert_bitwise_equal(got_v, exp_v, f"velocity, {dtype}")


def test_strided_stochastic_rounding_and_master_match_cpu(harness):
    cfg = VARIANTS[3]
    seed, step = 99, 7
    sp, sg, sv = (Strided(x, lambda a: a.T) for x in _tensors_2d((6, 9), 31))
    got_p, _ = cuda_sgd_strided(
        harness, sp, sg, sv, cfg, rounding_seed=seed, rounding_step=step, tensor_index=2
    )
    ps = [sp.array] * 3
    exp_p, _ = mfs.sgd_update_many(
        ps,
        [sg.array] * 3,
        [sv.array] * 3,
        learning_rate=0.0371,
        rounding_seed=seed,
        rounding_step=step,
        **cfg,
    )
    assert_bitwise_equal(got_p, exp_p[2])
    m = Strided(sp.base.astype(mx.float32) * 1.001, lambda a: a.T)
    got_p, _, got_m = cuda_sgd_strided(harness, sp, sg, sv, cfg, master=m)
    exp_p, _, exp_m = mfs.sgd_update_many(
        [sp.array],
        [sg.array],
        [sv.array],
        learning_rate=0.0371,
        master_params=[m.array],
        **cfg,
    )
    assert_bitwise_equal(got_p, exp_p[0])
    assert_bitwise_equal(got_m, exp_m[0])


def _tensors_2d(shape, seed):
    return [
        mx.random.normal(shape, key=mx.random.key(seed + k)).astype(mx.bfloat16)
        for k in range(3)
    ]


def cuda_grad_read(h, kind, grads, slot_fill=float("nan")):
    """kind 0: the non-finite flag; 1: the squared norm, whose blocks write
    slots that start as ``slot_fill`` (NaN: a slot no block writes shows).
    Row- or column-contiguous gradients are read flat, the others strided."""
    dtype = arrays_of(grads)[0].dtype
    data, sizes, dense, ndims, shapes, strides, keep = [], [], [], [], [], [], []
    for g in grads:
        if isinstance(g, Strided):
            keep.append(g)
            data.append(buffer_ptr(g).value)
            dense.append(0)
            ndims.append(g.array.ndim)
            shapes += list(g.array.shape)
            strides += list(g.strides)
            sizes.append(g.array.size)
        else:
            x = host_bits(g).reshape(-1)
            keep.append(x)
            data.append(x.ctypes.data)
            dense.append(1)
            ndims.append(0)
            sizes.append(g.size)
    result = np.zeros(1, np.float32 if kind == 1 else np.uint32)
    n = len(grads)
    rc = h.run_grad_read(
        kind,
        DTYPE_CODES[dtype],
        n,
        (P * n)(*data),
        host_ptr(np.array(sizes, np.int64)),
        host_ptr(np.array(dense, np.int32)),
        host_ptr(np.array(ndims, np.int32)),
        host_ptr(np.array(shapes or [0], np.int64)),
        host_ptr(np.array(strides or [0], np.int64)),
        host_ptr(result),
        slot_fill,
    )
    assert rc == 0, f"run_grad_read returned {rc}"
    return result[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bad", [None, np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [0, 4095, 4096, 9000])
def test_grad_check_matches_cpu(harness, dtype, bad, where):
    gs = [mx.random.normal((s,), key=mx.random.key(s)).astype(dtype) for s in (9001, 5)]
    if bad is not None:
        host = np.array(gs[0].astype(mx.float32))
        host[where] = bad
        gs[0] = mx.array(host).astype(dtype)
    tr = Strided(
        mx.random.normal((7, 5), key=mx.random.key(3)).astype(dtype), lambda a: a.T
    )
    grads = [gs[0], tr, gs[1]]
    flag = cuda_grad_read(harness, 0, grads)
    expected = mfs.grads_nonfinite(arrays_of(grads)).item()
    assert bool(flag) == expected


def test_grad_check_sees_a_bad_element_in_a_strided_gradient(harness):
    base = np.array(mx.random.normal((40, 9), key=mx.random.key(8)))
    base[13, 2] = np.inf
    # Row 13 is in rows 1, 4, ..., 37, not in rows 0, 3, ..., 39.
    assert cuda_grad_read(harness, 0, [Strided(mx.array(base), lambda a: a[1::3])]) == 1
    assert cuda_grad_read(harness, 0, [Strided(mx.array(base), lambda a: a[::3])]) == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grad_norm_matches_cpu(harness, dtype):
    # Over 256 blocks in all: every thread of sum_partials' block has slots
    # to add (the harness's shared memory outlives a block, so a block sum
    # that reads it too early is seen only where a later block's values do
    # not make up for it).
    gs = [
        mx.random.normal((s,), key=mx.random.key(s)).astype(dtype)
        for s in (1, 4096, 4097, 3 * CHUNK + 100, 260 * CHUNK + 9)
    ]
    sl = Strided(
        mx.random.normal((30, 11), key=mx.random.key(4)).astype(dtype), lambda a: a[::2]
    )
    grads = gs + [sl]
    got = float(cuda_grad_read(harness, 1, grads))
    expected = float(mfs.grad_norm(arrays_of(grads))) ** 2
    assert abs(got - expected) <= 1e-5 * expected


def test_grad_norm_has_the_same_bits_whatever_order_the_blocks_run(harness):
    """A GPU runs blocks in no set order. The norm's blocks write slots of
    their own, added up in one fixed order, so the launches' blocks run
    first to last and last to first give the same bits (a data-parallel
    job's ranks clip by the same factor). The slots start at zero here, so
    that blocks adding into one float instead would give the right norm
    and differ only in the order (a mutation below)."""
    # The first block's sum (4,096 squares of 1000: 4.1e9, float32 steps of
    # 512 there) dwarfs each other's (about 105, under half a step), but
    # not all 44 others' together: added to the big one one at a time they
    # vanish, added up first they do not.
    host = np.full(45 * CHUNK + 7, 0.16, np.float32)
    host[:CHUNK] = 1000.0
    big = mx.array(host)
    sl = Strided(mx.random.normal((300, 50), key=mx.random.key(5)), lambda a: a[::3])
    grads = [big, sl, mx.random.normal((5 * CHUNK,), key=mx.random.key(6))]
    forward = norm_in_both_orders(
        harness.set_reverse_blocks,
        lambda: cuda_grad_read(harness, 1, grads, slot_fill=0.0),
    )
    expected = float(mfs.grad_norm(arrays_of(grads))) ** 2
    assert abs(float(forward) - expected) <= 1e-5 * expected


@pytest.mark.parametrize("contiguous", [True, False])
def test_step_decay_kernel_matches_cpu(harness, contiguous):
    sched = mfs.step_decay(0.1, 0.9, 10)
    steps = np.array([0, 9, 10, 11, 99, 100, 2**40 + 3, 12345], np.uint64)
    out = np.zeros(steps.size, np.float32)
    if contiguous:
        rc = harness.run_step_decay(
            host_ptr(steps), host_ptr(out), steps.size, 0.1, 0.9, 10, 0, None, None
        )
        arr = mx.array(steps)
    else:
        base = np.repeat(steps, 2)
        shape = np.array([steps.size], np.int64)
        st = np.array([2], np.int64)
        rc = harness.run_step_decay(
            host_ptr(base),
            host_ptr(out),
            steps.size,
            0.1,
            0.9,
            10,
            1,
            host_ptr(shape),
            host_ptr(st),
        )
        arr = mx.array(base)[::2]
    assert rc == 0
    assert_bitwise_equal(mx.array(out), sched(arr))


# --------------------------------------------------------------------------
# The harness must catch a broken kernel
# --------------------------------------------------------------------------

MUTATIONS = {
    "block finds the wrong tensor of its table": (
        "kernels/sgd_plan.h",
        "while (t + 1 < count && block >= block_end[t]) {",
        "while (t + 1 < count && block > block_end[t]) {",
    ),
    "vector path skips every other vector": (
        "kernels/sgd_update.cuh",
        "(int64_t(k) * cuda_launch::kThreads + threadIdx.x) *",
        "(int64_t(k) * 2 * cuda_launch::kThreads + threadIdx.x) *",
    ),
    "tail of a chunk dropped": (
        "kernels/sgd_update.cuh",
        "for (int64_t i = begin + threadIdx.x; i < end; i += cuda_launch::kThreads) {",
        "for (int64_t i = begin + threadIdx.x; i + 1 < end; i += cuda_launch::kThreads) {",
    ),
    "warp sum misses half the lanes": (
        "kernels/grad_check.cuh",
        "for (int offset = cuda_launch::kWarpSize / 2; offset > 0; offset /= 2) {",
        "for (int offset = cuda_launch::kWarpSize / 4; offset > 0; offset /= 2) {",
    ),
    "block reduction without its barrier": (
        "kernels/grad_check.cuh",
        "  __syncthreads();\n",
        "\n",
    ),
    "a thread returns before the block's barrier": (
        "kernels/grad_check.cuh",
        "  float local = 0.0f;\n  for (int k = 0; k < kReadsPerThread; ++k) {\n"
        "    const int64_t i =\n        begin + int64_t(k) * cuda_launch::kThreads + int64_t(threadIdx.x);\n"
        "    if (i < size) {\n      local = local + read_value<kNorm>(static_cast<float>(x[i]));",
        "  float local = 0.0f;\n  if (threadIdx.x == 255) {\n    return;\n  }\n"
        "  for (int k = 0; k < kReadsPerThread; ++k) {\n"
        "    const int64_t i =\n        begin + int64_t(k) * cuda_launch::kThreads + int64_t(threadIdx.x);\n"
        "    if (i < size) {\n      local = local + read_value<kNorm>(static_cast<float>(x[i]));",
    ),
    "table marks misaligned tensors for vector loads": (
        "kernels/cuda_launch.h",
        "    table.vector_ok |= aligned ? (1u << k) : 0u;",
        "    table.vector_ok |= 1u << k;",
    ),
    "norm's blocks add into one float atomically": (
        "kernels/grad_check.cuh",
        "    static_cast<float*>(result)[slot] = total;",
        "    atomicAdd(static_cast<float*>(result) + 0 * slot, total);",
        "t.test_grad_norm_has_the_same_bits_whatever_order_the_blocks_run(h)",
    ),
}


def test_guard_bytes_catch_a_write_outside_a_tensor():
    """The guard bytes that catch a kernel straying past its tensor, where
    the stray write would be undefined behaviour on the host's heap."""
    for misaligned in (False, True):
        x = guarded(np.arange(5, dtype=np.float32), misaligned)
        assert (
            np.array_equal(x, np.arange(5)) and (x.ctypes.data % 16 != 0) == misaligned
        )
        assert_in_bounds([x], "param")
        start = x.ctypes.data - x.base.ctypes.data
        for byte, first in ((start + x.nbytes + 3, 23), (start - 1, -1)):
            x.base[byte] = 0
            with pytest.raises(
                AssertionError,
                match=f"outside param of tensor 0: 1 bytes, the first {first} ",
            ):
                assert_in_bounds([x], "param")
            x.base[byte] = SENTINEL


# Run in a child process: a mutant may also crash (a misaligned vector load,
# on a GPU a fault, here a signal). One that strays past its tensor is caught
# by the guard bytes around every tensor (helpers.guarded), as an
# AssertionError.
CHECK_MUTANT = """
import sys
sys.path.insert(0, {tests!r})
import mlx.core as mx
import numpy as np
import test_cuda_harness as t
h = t.load_harness(t.Path({lib!r}))
{check}
"""
# What a mutant runs, unless its mutation names its own check.
GRAD_CHECKS = (
    "t.test_grad_norm_matches_cpu(h, mx.float32)\n"
    "t.test_grad_check_matches_cpu(h, mx.float32, np.nan, 9000)"
)
SGD_CHECKS = "t.test_multi_tensor_kernel_matches_cpu(h, mx.float32, t.VARIANTS[3])"


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_harness_catches_a_broken_kernel(tmp_path, mutation):
    rel, before, after, *check = MUTATIONS[mutation]
    shutil.copytree(ROOT / "kernels", tmp_path / "kernels")
    target = tmp_path / rel
    text = target.read_text()
    assert text.count(before) >= 1, f"mutation anchor not found in {rel}"
    target.write_text(text.replace(before, after, 1))
    build_harness(tmp_path, kernels_root=tmp_path, optimize="-O0")
    script = CHECK_MUTANT.format(
        tests=str(ROOT / "tests"),
        lib=str(tmp_path / "cuda_harness.so"),
        check=check[0] if check else GRAD_CHECKS if "grad_check" in rel else SGD_CHECKS,
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0, "the harness passed a broken kernel"
    # A failed comparison or a crash; not an error in the check itself.
    assert "AssertionError" in proc.stderr or proc.returncode < 0, proc.stderr[-2000:]
