"""The Metal kernels, verified on Linux.

Every ``kernels/*.metal`` file is compiled as C++ with the system compiler
against ``tests/metal_shim/metal_stdlib`` (a stand-in for ``<metal_stdlib>``)
and ``tests/metal_harness.cpp`` runs each kernel over the grid that
``eval_gpu`` launches, with the buffers and constants ``eval_gpu`` binds (both
take them from ``kernels/metal_launch.h``). The outputs are compared bit for bit
with this package's CPU primitives, which are bit-identical to stock MLX.
What this cannot show: the Metal compiler's own code generation and
``metal::pow``'s rounding on a real GPU (the macOS CI job runs the suite there).
"""

import ctypes
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_fused_sgd as mfs

from helpers import (
    GENERAL_LAYOUTS,
    HOST_DTYPE,
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
SHIM = ROOT / "tests" / "metal_shim"
HARNESS = ROOT / "tests" / "metal_harness.cpp"
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


SIZES = [1, 3, 4, 5, 7, 8, 9, 1023, 1025]


def build_harness(
    out_dir: Path, kernels_root: Path = ROOT, optimize: str = "-O1"
) -> ctypes.CDLL:
    """Compile the harness with ``kernels/`` taken from ``kernels_root``."""
    lib = compile_harness(
        HARNESS, [SHIM, kernels_root], out_dir / "metal_harness.so", optimize
    )
    h = ctypes.CDLL(str(lib))
    p = ctypes.c_void_p
    h.run_sgd.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,  # state dtype
        ctypes.c_double,
        ctypes.c_double,
        ctypes.c_double,
        ctypes.c_int,
        ctypes.c_int,  # maximize
        ctypes.c_int,  # scaled
        ctypes.c_int,  # has_skip
        ctypes.c_int,  # has_clip
        ctypes.c_int,
        ctypes.c_double,
        ctypes.c_double,
        ctypes.c_int64,
        ctypes.c_int,
        ctypes.c_int64,
        ctypes.c_int,
        p,
        p,
        p,
        p,
        p,
        p,
        p,
        p,
        p,
        p,
        p,
        p,
        p,
        p,
        ctypes.c_int,  # rounding
        ctypes.c_uint64,  # seed
        ctypes.c_uint64,  # tensor index
        p,  # master
        p,  # master_out
        p,  # master strides
        p,  # rounding step
    ]
    h.run_grad_check.argtypes = [ctypes.c_int] + [p] * 8
    h.run_grad_norm.argtypes = [ctypes.c_int] + [p] * 8 + [ctypes.c_float]
    h.set_reverse_groups.argtypes = [ctypes.c_int]
    h.run_step_decay.argtypes = [
        ctypes.c_char_p,
        ctypes.c_double,
        ctypes.c_double,
        ctypes.c_int64,
        ctypes.c_int,
        ctypes.c_int64,
        ctypes.c_int,
        p,
        p,
        p,
        p,
    ]
    return h


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return build_harness(tmp_path_factory.mktemp("metal"))


ROUNDING = {"nearest": 0, "stochastic": 1, "master": 2}


def metal_sgd(
    h,
    param,
    grad,
    velocity,
    cfg,
    lr=None,
    step=None,
    schedule=None,
    skip=None,
    master=None,
    rounding_seed=None,
    rounding_step=0,
    tensor_index=0,
):
    """Run the kernel eval_gpu would pick; return (param_out, velocity_out),
    and master_out third when ``master`` is given."""
    rounding = (
        "master"
        if master is not None
        else "stochastic"
        if rounding_seed is not None
        else "nearest"
    )
    arrays = [param, grad, velocity if velocity is not None else grad]
    if master is not None:
        arrays.append(master)
    strided = any(isinstance(a, Strided) for a in arrays)
    ref = arrays[0].array if isinstance(arrays[0], Strided) else arrays[0]
    shape, dtype = ref.shape, ref.dtype
    size = int(np.prod(shape)) if shape else 1
    bufs, strides = [], []
    for a in arrays:
        if isinstance(a, Strided):
            bufs.append(a)
            strides.append(a.strides)
        else:
            bufs.append(host_bits(a).reshape(-1))
            st = np.ones(len(shape), np.int64)
            for d in range(len(shape) - 2, -1, -1):
                st[d] = st[d + 1] * shape[d + 1]
            strides.append(st)
    vref = arrays[2].array if isinstance(arrays[2], Strided) else arrays[2]
    state_dtype = vref.dtype if velocity is not None else dtype
    out_p = guarded(np.zeros(size, HOST_DTYPE[dtype]))
    out_v = guarded(np.zeros(size, HOST_DTYPE[state_dtype]))
    out_m = guarded(np.zeros(size, np.float32))
    rstep_arr = np.array([rounding_step], np.uint64)
    shape_arr = np.array(shape, np.int32) if shape else np.zeros(1, np.int32)
    lr_arr = np.array([lr if lr is not None else 0.0], np.float32)
    step_arr = np.array([step if step is not None else 0], np.uint64)
    scale = cfg.get("grad_scale")
    scale_arr = np.array([scale if scale is not None else 1.0], np.float32)
    skip_arr = np.array([skip if skip is not None else 0], np.uint32)
    clip = cfg.get("clip_factor")
    clip_arr = np.array([clip.item() if clip is not None else 1.0], np.float32)
    sched = schedule or mfs.step_decay(1.0, 1.0, 1)
    rc = h.run_sgd(
        str(dtype).split(".")[-1].encode(),
        str(state_dtype).split(".")[-1].encode(),
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
        int(not strided),
        size,
        len(shape),
        host_ptr(shape_arr),
        host_ptr(strides[0]),
        host_ptr(strides[1]),
        host_ptr(strides[2]),
        buffer_ptr(bufs[0]),
        buffer_ptr(bufs[1]),
        buffer_ptr(bufs[2]),
        host_ptr(out_p),
        host_ptr(out_v),
        host_ptr(lr_arr),
        host_ptr(step_arr),
        host_ptr(scale_arr),
        host_ptr(skip_arr),
        host_ptr(clip_arr),
        ROUNDING[rounding],
        rounding_seed or 0,
        tensor_index,
        buffer_ptr(bufs[3]) if master is not None else None,
        host_ptr(out_m),
        host_ptr(strides[3]) if master is not None else None,
        host_ptr(rstep_arr),
    )
    assert rc == 0, f"kernel for {dtype} {cfg} not instantiated (rc {rc})"
    for what, out in (
        ("param out", out_p),
        ("momentum out", out_v),
        ("master out", out_m),
    ):
        assert_in_bounds([out], what)

    def back(x, dt):
        arr = mx.array(x.reshape(shape))
        return arr.view(mx.bfloat16) if dt == mx.bfloat16 else arr

    if master is not None:
        return back(out_p, dtype), back(out_v, state_dtype), back(out_m, mx.float32)
    return back(out_p, dtype), back(out_v, state_dtype)


def _inputs(shape, dtype, seed):
    k = mx.random.split(mx.random.key(seed), 3)
    return [mx.random.normal(shape, key=kk).astype(dtype) for kk in k]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize(
    "cfg",
    VARIANTS,
    ids=cfg_id,
)
def test_contiguous_kernel_matches_cpu(harness, dtype, cfg):
    for size in SIZES:
        p, g, v = _inputs((size,), DTYPES[dtype], size)
        got_p, got_v = metal_sgd(harness, p, g, v, cfg, lr=0.0371)
        exp_p, exp_v = mfs.sgd_update(p, g, v, learning_rate=mx.array(0.0371), **cfg)
        assert_bitwise_equal(got_p, exp_p, f"param, size {size}")
        if cfg["momentum"] > 0:
            assert_bitwise_equal(got_v, exp_v, f"velocity, size {size}")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("step", [0, 9, 10, 25, 2**40 + 3])
def test_scheduled_kernel_matches_cpu(harness, dtype, step):
    cfg = VARIANTS[3]
    sched = mfs.step_decay(0.1, 0.9, 10)
    p, g, v = _inputs((37,), DTYPES[dtype], 1)
    got_p, got_v = metal_sgd(harness, p, g, v, cfg, step=step, schedule=sched)
    exp_p, exp_v = mfs.sgd_update_scheduled(
        p, g, v, step=mx.array(np.uint64(step)), schedule=sched, **cfg
    )
    assert_bitwise_equal(got_p, exp_p)
    assert_bitwise_equal(got_v, exp_v)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("cfg", VARIANTS, ids=cfg_id)
@pytest.mark.parametrize("layout", list(GENERAL_LAYOUTS))
def test_general_kernel_matches_cpu(harness, dtype, cfg, layout):
    t = DTYPES[dtype]
    p, g, v = general_operands(layout, (t, t, t), 7)
    got_p, got_v = metal_sgd(harness, p, g, v, cfg, lr=0.05)
    exp_p, exp_v = mfs.sgd_update(*arrays_of((p, g, v)), learning_rate=0.05, **cfg)
    assert_bitwise_equal(got_p, exp_p)
    if cfg["momentum"] > 0:
        assert_bitwise_equal(got_v, exp_v)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize(
    "cfg", [VARIANTS[2], VARIANTS[5], VARIANTS[7], VARIANTS[10]], ids=cfg_id
)
def test_float32_momentum_for_half_params_matches_cpu(harness, dtype, cfg):
    t = DTYPES[dtype]
    for size in (5, 37):
        p, g, _ = _inputs((size,), t, size)
        v = mx.random.normal((size,), key=mx.random.key(size + 1))  # float32 state
        got_p, got_v = metal_sgd(harness, p, g, v, cfg, lr=0.0371)
        exp_p, exp_v = mfs.sgd_update(p, g, v, learning_rate=mx.array(0.0371), **cfg)
        assert got_v.dtype == mx.float32 and exp_v.dtype == mx.float32
        assert_bitwise_equal(got_p, exp_p)
        assert_bitwise_equal(got_v, exp_v)
    bp, bg = _inputs((5, 6), t, 11)[:2]
    base_v = mx.random.normal((5, 6), key=mx.random.key(12))  # float32 state
    sp, sg, sv = (Strided(x, lambda a: a.T) for x in (bp, bg, base_v))
    got_p, got_v = metal_sgd(harness, sp, sg, sv, cfg, lr=0.05)
    exp_p, exp_v = mfs.sgd_update(
        sp.array, sg.array, sv.array, learning_rate=0.05, **cfg
    )
    assert_bitwise_equal(got_p, exp_p)
    assert_bitwise_equal(got_v, exp_v)


# The (param, momentum buffer) dtype pairs of the half-precision storage
# modes: stochastic rounding for bfloat16, master weights for both halves.
HALF_PAIRS = {
    "stochastic": [("bfloat16", "bfloat16"), ("bfloat16", "float32")],
    "master": [
        ("float16", "float16"),
        ("float16", "float32"),
        ("bfloat16", "bfloat16"),
        ("bfloat16", "float32"),
    ],
}


def _state(state_dtype, shape, seed):
    """A momentum buffer of `state_dtype`."""
    return mx.random.normal(shape, key=mx.random.key(seed)).astype(DTYPES[state_dtype])


@pytest.mark.parametrize("pair", HALF_PAIRS["master"], ids="-".join)
@pytest.mark.parametrize("cfg", VARIANTS, ids=cfg_id)
def test_master_weight_kernels_match_cpu(harness, pair, cfg):
    dtype, state_dtype = pair
    t = DTYPES[dtype]
    for size in (5, 37):
        m = mx.random.normal((size,), key=mx.random.key(size))  # float32 master
        # Every third param changed since its copy was written (stale): the
        # update starts from the param there, from the copy elsewhere.
        stale = mx.arange(size) % 3 == 0
        p = mx.where(stale, (m * 1.5 + 0.25).astype(t), m.astype(t))
        g = mx.random.normal((size,), key=mx.random.key(size + 1)).astype(t)
        v = _state(state_dtype, (size,), size + 2)
        got = metal_sgd(harness, p, g, v, cfg, lr=0.0371, master=m)
        exp = mfs.sgd_update_many(
            [p], [g], [v], learning_rate=0.0371, master_params=[m], **cfg
        )
        assert_bitwise_equal(got[0], exp[0][0], f"param, size {size}")
        assert_bitwise_equal(got[2], exp[2][0], f"master, size {size}")
        if cfg["momentum"] > 0:
            assert_bitwise_equal(got[1], exp[1][0], f"velocity, size {size}")
    base_m = mx.random.normal((5, 6), key=mx.random.key(3))
    sm = Strided(base_m, lambda a: a.T)
    sp = Strided(base_m.astype(t), lambda a: a.T)
    sg = Strided(
        mx.random.normal((5, 6), key=mx.random.key(4)).astype(t), lambda a: a.T
    )
    sv = Strided(_state(state_dtype, (5, 6), 5), lambda a: a.T)
    got = metal_sgd(harness, sp, sg, sv, cfg, lr=0.05, master=sm)
    exp = mfs.sgd_update_many(
        [sp.array],
        [sg.array],
        [sv.array],
        learning_rate=0.05,
        master_params=[sm.array],
        **cfg,
    )
    assert_bitwise_equal(got[0], exp[0][0])
    assert_bitwise_equal(got[2], exp[2][0])


@pytest.mark.parametrize("pair", HALF_PAIRS["stochastic"], ids="-".join)
@pytest.mark.parametrize("cfg", VARIANTS, ids=cfg_id)
def test_stochastic_rounding_kernels_match_cpu(harness, pair, cfg):
    dtype, state_dtype = pair
    t = DTYPES[dtype]
    seed, step = 2**40 + 17, 2**33 + 5
    for size in (5, 37, 1025):
        # Three tensors: the kernel for the third (index 2) must use that
        # tensor's random stream, as the CPU primitive does.
        ps = [
            mx.random.normal((size,), key=mx.random.key(size + k)).astype(t)
            for k in range(3)
        ]
        gs = [
            mx.random.normal((size,), key=mx.random.key(size + 9 + k)).astype(t)
            for k in range(3)
        ]
        vs = [_state(state_dtype, (size,), size + 20 + k) for k in range(3)]
        exp_p, exp_v = mfs.sgd_update_many(
            ps,
            gs,
            vs,
            learning_rate=0.0371,
            rounding_seed=seed,
            rounding_step=step,
            **cfg,
        )
        got_p, got_v = metal_sgd(
            harness,
            ps[2],
            gs[2],
            vs[2],
            cfg,
            lr=0.0371,
            rounding_seed=seed,
            rounding_step=step,
            tensor_index=2,
        )
        assert_bitwise_equal(got_p, exp_p[2], f"param, size {size}")
        if cfg["momentum"] > 0:
            assert_bitwise_equal(got_v, exp_v[2], f"velocity, size {size}")
    sp, sg, sv = (
        Strided(x, lambda a: a.T)
        for x in _inputs((5, 6), t, 9)[:2] + [_state(state_dtype, (5, 6), 10)]
    )
    got_p, _ = metal_sgd(
        harness, sp, sg, sv, cfg, lr=0.05, rounding_seed=seed, rounding_step=step
    )
    exp_p, _ = mfs.sgd_update_many(
        [sp.array],
        [sg.array],
        [sv.array],
        learning_rate=0.05,
        rounding_seed=seed,
        rounding_step=step,
        **cfg,
    )
    assert_bitwise_equal(got_p, exp_p[0])


@pytest.mark.parametrize(
    "mode, pair",
    [("master", pr) for pr in HALF_PAIRS["master"]]
    + [("stochastic", pr) for pr in HALF_PAIRS["stochastic"]],
    ids=lambda x: x if isinstance(x, str) else "-".join(x),
)
@pytest.mark.parametrize("layout", list(GENERAL_LAYOUTS))
def test_half_storage_general_kernels_match_cpu(harness, mode, pair, layout):
    """Master weights (the master copy laid out like the gradient) and
    stochastic rounding (bits keyed by the row-major index) on every general
    layout."""
    dtype, state_dtype = pair
    p, g, v = general_operands(layout, (DTYPES[dtype],) * 2 + (DTYPES[state_dtype],), 3)
    shape, _, grad_spec, _ = GENERAL_LAYOUTS[layout]
    base_shape, view = grad_spec if grad_spec is not None else (shape, None)
    base_m = mx.random.normal(base_shape, key=mx.random.key(99))
    m = base_m if view is None else Strided(base_m, view)
    seed, step = 2**40 + 17, 2**33 + 5
    for cfg in (VARIANTS[3], VARIANTS[7], VARIANTS[10]):
        if mode == "master":
            got = metal_sgd(harness, p, g, v, cfg, lr=0.05, master=m)
            exp = mfs.sgd_update_many(
                *([x] for x in arrays_of((p, g, v))),
                learning_rate=0.05,
                master_params=arrays_of([m]),
                **cfg,
            )
            assert_bitwise_equal(got[2], exp[2][0], "master")
        else:
            got = metal_sgd(
                harness, p, g, v, cfg, lr=0.05, rounding_seed=seed, rounding_step=step
            )
            exp = mfs.sgd_update_many(
                *([x] for x in arrays_of((p, g, v))),
                learning_rate=0.05,
                rounding_seed=seed,
                rounding_step=step,
                **cfg,
            )
        assert_bitwise_equal(got[0], exp[0][0], "param")
        assert_bitwise_equal(got[1], exp[1][0], "velocity")


def test_every_instantiated_kernel_is_one_eval_gpu_can_launch(harness):
    # SGD: a contiguous and a general kernel for each (param dtype, momentum
    # buffer, storage mode); the other options are run-time flags. With
    # momentum, 5 (param, buffer) dtype pairs round to nearest (3 alike, and
    # float16/bfloat16 params with float32 buffers), and the pairs in
    # HALF_PAIRS store stochastically or from master weights; without
    # momentum (no buffer), one kernel per param dtype and storage mode.
    # Each one is run by the tests above (a missing name makes them fail).
    # + 8 step dtypes x 2 layouts.
    # + the non-finite check and the squared norm: 3 dtypes x 2 layouts and
    # a clear kernel each.
    with_momentum = 5 + len(HALF_PAIRS["stochastic"]) + len(HALF_PAIRS["master"])
    modes = {"nearest": 3, "stochastic": 1, "master": 2}  # param dtypes each
    without_momentum = sum(modes.values())
    sgd = (with_momentum + without_momentum) * 2
    assert harness.harness_kernel_count() == sgd + 8 * 2 + 2 * (3 * 2 + 1)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("skip", [0, 1])
def test_skip_flag_in_kernels_matches_cpu(harness, dtype, skip):
    """A set skip flag makes every kernel variant a copy of its inputs."""
    for cfg in (VARIANTS[0], VARIANTS[3], VARIANTS[9]):
        p, g, v = _inputs((37,), DTYPES[dtype], 3)
        got_p, got_v = metal_sgd(harness, p, g, v, cfg, lr=0.05, skip=skip)
        flag = mx.array(skip, mx.uint32)
        exp_p, exp_v = mfs.sgd_update(p, g, v, learning_rate=0.05, skip=flag, **cfg)
        assert_bitwise_equal(got_p, exp_p)
        if cfg["momentum"] > 0:
            assert_bitwise_equal(got_v, exp_v)
        if skip:
            assert_bitwise_equal(got_p, p)
        t = DTYPES[dtype]
        bp, bg, bv = _inputs((5, 6), t, 4)
        sp, sg, sv = (Strided(x, lambda a: a.T) for x in (bp, bg, bv))
        got_p, _ = metal_sgd(harness, sp, sg, sv, cfg, lr=0.05, skip=skip)
        exp_p, _ = mfs.sgd_update(
            sp.array, sg.array, sv.array, learning_rate=0.05, skip=flag, **cfg
        )
        assert_bitwise_equal(got_p, exp_p)


def metal_grad_check(
    h, arrays, fn="run_grad_check", out_dtype=np.uint32, slot_fill=float("nan")
):
    """The output GradCheck's kernels (or GradNorm's, with
    fn="run_grad_norm", whose threadgroups write slots that start as
    ``slot_fill``: NaN, so that a slot no threadgroup writes shows) produce
    for a chunk of tensors."""
    keep = []
    dtypes, contig, sizes, ndims, shapes, strides, data = ([] for _ in range(7))
    for a in arrays:
        if isinstance(a, Strided):
            ref, buf, st = a.array, a, a.strides
            contig.append(0)
        else:
            ref, buf = a, host_bits(a).reshape(-1)
            st = np.ones(max(a.ndim, 1), np.int64)
            contig.append(1)
        shape = np.array(ref.shape or (1,), np.int32)
        keep += [buf, shape, st]
        dtypes.append(str(ref.dtype).split(".")[-1].encode())
        sizes.append(ref.size)
        ndims.append(ref.ndim)
        shapes.append(shape.ctypes.data)
        strides.append(st.ctypes.data)
        data.append(buffer_ptr(buf).value)
    n = len(arrays)
    flag = np.zeros(1, out_dtype)
    rc = getattr(h, fn)(
        n,
        (ctypes.c_char_p * n)(*dtypes),
        host_ptr(np.array(contig, np.int32)),
        host_ptr(np.array(sizes, np.int64)),
        host_ptr(np.array(ndims, np.int32)),
        (ctypes.c_void_p * n)(*shapes),
        (ctypes.c_void_p * n)(*strides),
        (ctypes.c_void_p * n)(*data),
        host_ptr(flag),
        *([slot_fill] if fn == "run_grad_norm" else []),
    )
    assert rc == 0
    return bool(flag[0]) if out_dtype == np.uint32 else flag[0]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("bad", [None, np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [0, 6, 36])
def test_grad_check_kernels_match_cpu(harness, dtype, bad, where):
    t = DTYPES[dtype]
    a, b, c = _inputs((37,), t, 5)
    if bad is not None:
        host = np.array(b.astype(mx.float32))
        host[where] = bad
        b = mx.array(host).astype(t)
    base = _inputs((5, 6), t, 6)[0]
    chunk = [a, Strided(base, lambda x: x.T), b, c]
    got = metal_grad_check(harness, chunk)
    expected = mfs.grads_nonfinite([a, base.T, b, c]).item()
    assert got == expected == (bad is not None)
    # A bad value at either end of a SIMD group's span, and past it, in a
    # long contiguous and a strided gradient.
    for size, at in ((1300, 511), (1300, 512), (1300, 1299)):
        host = np.ones(size, np.float32)
        if bad is not None:
            host[at] = bad
        long = mx.array(host).astype(t)
        wide = mx.array(host.reshape(13, 100)).astype(t)
        got = metal_grad_check(harness, [long])
        got_strided = metal_grad_check(harness, [Strided(wide.T, lambda x: x.T)])
        assert got == got_strided == (bad is not None)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_grad_norm_kernels_match_cpu(harness, dtype):
    """The kernels add float32 partial sums (in grid order here, in any order
    on a GPU); the CPU sums each tensor in double. They agree to float32
    rounding of the partial sums."""
    t = DTYPES[dtype]
    # Sizes around a SIMD group's span (kSimdWidth * kReadsPerThread = 512)
    # and a strided tensor over several groups.
    a, b, c = _inputs((1037,), t, 8)
    d, e = _inputs((511,), t, 10)[0], _inputs((513,), t, 11)[0]
    base = _inputs((5, 6), t, 9)[0]
    wide = _inputs((70, 90), t, 12)[0]
    arrays = [a, base, b, c, mx.zeros((0,), t), d, e, wide]
    chunk = [Strided(x, lambda y: y.T) if x is base or x is wide else x for x in arrays]
    got = float(metal_grad_check(harness, chunk, "run_grad_norm", np.float32))
    expected = mfs._ext.grads_sq_norm(
        [x.T if x is base or x is wide else x for x in arrays]
    ).item()
    exact = sum(
        float(np.sum(np.array(x.astype(mx.float32), np.float64) ** 2)) for x in arrays
    )
    assert abs(got - exact) <= 1e-5 * exact
    assert abs(expected - exact) <= 1e-6 * exact


def test_grad_norm_has_the_same_bits_whatever_order_the_threadgroups_run(harness):
    """A GPU runs threadgroups in no set order. The norm's threadgroups
    write slots of their own, added up in one fixed order, so grids run
    first to last and last to first give the same bits (a data-parallel
    job's ranks clip by the same factor). The slots start at zero here, so
    that threadgroups adding into one float instead would give the right
    norm and differ only in the order (a mutation below)."""
    # The first threadgroup's sum (16,384 squares of 100: 1.6e8, float32
    # steps of 16 there) dwarfs each other's (about 5, under half a step),
    # but not all 39 others' together: added to the big one one at a time
    # they vanish, added up first they do not.
    host = np.full(40 * 16 * 1024 + 5, 0.0175, np.float32)
    host[: 16 * 1024] = 100.0
    big = mx.array(host)
    wide = _inputs((300, 90), mx.float32, 13)[0]
    chunk = [big, Strided(wide, lambda y: y.T)]
    forward = norm_in_both_orders(
        harness.set_reverse_groups,
        lambda: metal_grad_check(harness, chunk, "run_grad_norm", np.float32, 0.0),
    )
    exact = float(np.sum(np.array(big, np.float64) ** 2)) + float(
        np.sum(np.array(wide, np.float64) ** 2)
    )
    assert abs(float(forward) - exact) <= 1e-5 * exact


STEP_DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]


def metal_step_decay(h, steps: np.ndarray, sched, contiguous=True):
    shape = steps.shape
    base = np.ascontiguousarray(steps) if contiguous else steps.base
    strides = np.array([s // steps.itemsize for s in steps.strides], np.int64)
    out = np.zeros(steps.size, np.float32)
    shape_arr = np.array(shape or (1,), np.int32)
    rc = h.run_step_decay(
        str(steps.dtype).encode(),
        float(sched.init),
        float(sched.decay_rate),
        sched.step_size,
        int(contiguous),
        steps.size,
        len(shape),
        host_ptr(shape_arr),
        host_ptr(strides),
        host_ptr(base),
        host_ptr(out),
    )
    assert rc == 0
    return mx.array(out.reshape(shape))


@pytest.mark.parametrize("dtype", STEP_DTYPES)
def test_step_decay_kernel_matches_cpu(harness, dtype):
    sched = mfs.step_decay(0.1, 0.9, 7)
    steps = np.arange(0, 120, dtype=dtype)
    assert_bitwise_equal(
        metal_step_decay(harness, steps, sched), sched(mx.array(steps))
    )
    grid = np.arange(0, 60, dtype=dtype).reshape(6, 10)
    view = grid.T  # general kernel
    assert_bitwise_equal(
        metal_step_decay(harness, view, sched, contiguous=False),
        sched(mx.array(grid).T),
    )


# --------------------------------------------------------------------------
# The harness must catch a broken kernel.
# --------------------------------------------------------------------------

MUTATIONS = {
    "update sign flipped in the shared math": (
        "kernels/sgd_math.h",
        "ParamVelocity out = {p - step, v};\n  return out;\n}\n\n// How",
        "ParamVelocity out = {p + step, v};\n  return out;\n}\n\n// How",
    ),
    "contiguous kernel drops the last tail element": (
        "kernels/sgd_update.metal",
        "for (int64_t i = begin; i < args.size; ++i)",
        "for (int64_t i = begin; i + 1 < args.size; ++i)",
    ),
    "squared norm drops the last element": (
        "kernels/grad_check.metal",
        "if (i < args.size) {\n      const float v = static_cast<float>(x[i]);",
        "if (i + 1 < args.size) {\n      const float v = static_cast<float>(x[i]);",
    ),
    "squared norm without the SIMD sum": (
        "kernels/grad_check.metal",
        "const float group = simd_sum(value);",
        "const float group = value;",
    ),
    "squared norm without the threadgroup barrier": (
        "kernels/grad_check.metal",
        "  threadgroup_barrier(mem_flags::mem_threadgroup);\n  float total",
        "  float total",
    ),
    "threadgroups add their sums into one float, in the order they ran": (
        "kernels/grad_check.metal",
        "    slots[slot] = total;",
        "    slots[0] += total + 0 * slot;",
    ),
    "non-finite check returns before the barrier (divergent)": (
        "kernels/grad_check.metal",
        "static_cast<float>(x[i]));\n    }\n  }\n  flag_if_any(",
        "static_cast<float>(x[i]));\n    }\n  }\n  if (!bad) {\n    return;\n  }"
        "\n  flag_if_any(",
    ),
    "non-finite test blind to Inf": (
        "kernels/sgd_math.h",
        "return !(d == 0.0f);",
        "return d != d && x != x;",
    ),
    "stochastic rounding bits taken for the wrong element": (
        "kernels/sgd_element.h",
        "math::rounding_bits(stream, element)",
        "math::rounding_bits(stream, element + 1)",
    ),
    "master-weight kernel reads the param, not its master copy": (
        "kernels/sgd_element.h",
        "p = math::master_or_param(m, static_cast<float>(static_cast<T>(m)), p);",
        "p = p;",
    ),
    "master-weight kernel keeps a stale master copy": (
        "kernels/sgd_element.h",
        "p = math::master_or_param(m, static_cast<float>(static_cast<T>(m)), p);",
        "p = m;",
    ),
    "general kernel steps the grad by the param's row stride": (
        "kernels/sgd_element.h",
        "at.ig += row_step.ig;",
        "at.ig += row_step.ip;",
    ),
    "general kernel drops the last row of each band": (
        "kernels/sgd_element.h",
        "for (int64_t r = r0; r < r_end; ++r) {",
        "for (int64_t r = r0; r + 1 < r_end; ++r) {",
    ),
    "step-decay kernel off by one in step_size": (
        "kernels/step_decay.metal",
        "step_decay_lr<I>(\n      step[i], I(args.step_size),",
        "step_decay_lr<I>(\n      step[i], I(args.step_size + 1),",
    ),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_harness_catches_a_broken_kernel(tmp_path, mutation):
    rel, before, after = MUTATIONS[mutation]
    shutil.copytree(ROOT / "kernels", tmp_path / "kernels")
    target = tmp_path / rel
    text = target.read_text()
    assert text.count(before) == 1, f"mutation anchor not found once in {rel}"
    target.write_text(text.replace(before, after))
    mutant = build_harness(tmp_path, kernels_root=tmp_path, optimize="-O0")
    if "order they ran" in mutation:
        # The right norm, but not the same bits when the order changes.
        with pytest.raises(AssertionError, match="depend on the order"):
            test_grad_norm_has_the_same_bits_whatever_order_the_threadgroups_run(mutant)
        return
    if "norm" in mutation:
        with pytest.raises(AssertionError, match="abs"):
            test_grad_norm_kernels_match_cpu(mutant, "float32")
        return
    if "divergent" in mutation:
        # The harness sees threads leave while others wait at the barrier.
        with pytest.raises(AssertionError, match="assert 3 == 0"):
            test_grad_check_kernels_match_cpu(mutant, "float32", np.nan, 6)
        return
    if "Inf" in mutation:
        # The mutant's flag stays 0 where the CPU check says 1.
        with pytest.raises(AssertionError, match="assert False == True"):
            test_grad_check_kernels_match_cpu(mutant, "float32", np.inf, 6)
        return
    with pytest.raises(AssertionError, match="differ"):
        if "stochastic" in mutation:
            test_stochastic_rounding_kernels_match_cpu(
                mutant, ("bfloat16", "bfloat16"), VARIANTS[3]
            )
        elif "master" in mutation:
            test_master_weight_kernels_match_cpu(
                mutant, ("bfloat16", "float32"), VARIANTS[3]
            )
        elif "general" in mutation:
            test_general_kernel_matches_cpu(
                mutant, "float32", VARIANTS[3], "transposed_grad"
            )
        elif rel.endswith("step_decay.metal"):
            test_step_decay_kernel_matches_cpu(mutant, "int32")
        else:
            test_contiguous_kernel_matches_cpu(mutant, "float32", VARIANTS[3])


# --------------------------------------------------------------------------
# eval_gpu against MLX's real Metal API
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source,metallib",
    [
        ("csrc/metal/sgd_update.cpp", True),
        ("csrc/metal/step_decay.cpp", True),
        ("csrc/metal/grad_check.cpp", True),
        ("csrc/utils.cpp", True),
        # A Mac without the Metal compiler: no metallib, no Metal eval_gpu.
        ("csrc/no_gpu/primitives.cpp", False),
        ("csrc/utils.cpp", False),
    ],
    ids=lambda x: {True: "with_metallib", False: "toolchain_missing"}.get(x, x),
)
def test_eval_gpu_compiles_against_mlx_metal_headers(source, metallib):
    """The Metal branches (eval_gpu, the metallib load check) are compiled,
    syntax only, against the installed MLX headers,
    mlx/backend/metal/device.h included; only metal-cpp (<Metal/Metal.hpp>)
    is a declarations-only stand-in (tests/metal_api_stub). A wrong MLX call
    or argument fails here, not first on a Mac. Also the build of an MLX
    with Metal on a Mac without the Metal compiler (no metallib)."""
    cxx = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    mlx_include = Path(mx.__file__).parent / "include"
    if not (mlx_include / "mlx" / "backend" / "metal" / "device.h").exists():
        pytest.skip("this MLX wheel ships no Metal headers")
    cmd = [
        cxx,
        "-std=c++20",
        "-fsyntax-only",
        "-D_METAL_",
        "-DMFS_HAVE_METALLIB" if metallib else "-DMFS_METAL_TOOLCHAIN_MISSING",
        f"-I{ROOT / 'tests' / 'metal_api_stub'}",
        f"-I{ROOT}",
        f"-I{ROOT / 'csrc'}",
        "-isystem",
        str(mlx_include),
        str(ROOT / source),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]


# --------------------------------------------------------------------------
# Buffer slots: g++ ignores Metal's [[buffer(n)]] attributes, so the harness
# passes arguments by position. Check that each kernel's parameters carry the
# slots eval_gpu binds, in that order (a swapped slot fails here).
# --------------------------------------------------------------------------

_SGD_SLOTS = [
    "kParam",
    "kGrad",
    "kVelocity",
    "kParamOut",
    "kVelocityOut",
    "kLearningRate",
    "kStep",
    "kSGDArgs",
]
_STRIDED = ["kShape", "kParamStrides", "kGradStrides", "kVelocityStrides"]
_SCALARS = [
    "kGradScale",
    "kSkip",
    "kClipFactor",
    "kMaster",
    "kMasterOut",
    "kRoundingStep",
]
EXPECTED_SLOTS = {
    ("sgd_update.metal", "sgd_contiguous"): _SGD_SLOTS + _SCALARS,
    ("sgd_update.metal", "sgd_general"): _SGD_SLOTS
    + _STRIDED
    + _SCALARS
    + ["kMasterStrides", "kOutStrides"],
    ("step_decay.metal", "step_decay_contiguous"): [
        "kStepIn",
        "kLearningRateOut",
        "kStepDecayArgs",
    ],
    ("step_decay.metal", "step_decay_general"): [
        "kStepIn",
        "kLearningRateOut",
        "kStepDecayArgs",
        "kStepShape",
        "kStepStrides",
    ],
    ("grad_check.metal", "grad_check_clear"): ["kCheckFlag"],
    ("grad_check.metal", "grad_check_contiguous"): [
        "kCheckIn",
        "kCheckFlag",
        "kCheckArgs",
    ],
    ("grad_check.metal", "grad_check_general"): [
        "kCheckIn",
        "kCheckFlag",
        "kCheckArgs",
        "kCheckShape",
        "kCheckStrides",
    ],
    ("grad_check.metal", "grad_norm_sum"): [
        "kNormSumSlots",
        "kNormSumOut",
        "kNormSumCount",
    ],
    ("grad_check.metal", "grad_norm_contiguous"): [
        "kNormIn",
        "kNormSlots",
        "kNormArgs",
    ],
    ("grad_check.metal", "grad_norm_general"): [
        "kNormIn",
        "kNormSlots",
        "kNormArgs",
        "kNormShape",
        "kNormStrides",
    ],
}


@pytest.mark.parametrize("where", list(EXPECTED_SLOTS), ids=lambda w: w[1])
def test_kernel_buffer_slots_are_the_ones_eval_gpu_binds(where):
    import re

    fname, kernel = where
    src = (ROOT / "kernels" / fname).read_text()
    m = re.search(rf"\[\[kernel\]\] void {kernel}\((.*?)\) {{", src, re.S)
    assert m, f"kernel {kernel} not found in {fname}"
    slots = re.findall(r"\[\[buffer\(mlx_fused_sgd::launch::(\w+)\)\]\]", m.group(1))
    assert slots == EXPECTED_SLOTS[where]
    launch = (ROOT / "kernels" / "metal_launch.h").read_text()
    values = {}
    for name in slots:
        v = re.search(rf"constexpr int {name} = (\w+);", launch)
        assert v, name
        values[name] = v.group(1)
    resolved = [values.get(values[n], values[n]) for n in slots]
    assert len(set(resolved)) == len(resolved), f"duplicate slot numbers: {resolved}"
