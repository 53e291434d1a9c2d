"""The fallback composed of stock MLX ops, which GPU streams take when this
build has no kernel for them (MLX's CUDA backend): same numbers as the
primitives, checked here on the CPU."""

import mlx.core as mx
import numpy as np
import pytest

import mlx_fused_sgd as mfs
from mlx_fused_sgd import _ext

from helpers import assert_bitwise_equal, sgd_fallback

VARIANTS = [
    dict(),
    dict(weight_decay=0.01),
    dict(momentum=0.9),
    dict(momentum=0.9, weight_decay=0.01),
    dict(momentum=0.7, dampening=0.25, weight_decay=0.02),
    dict(momentum=0.9, nesterov=True, weight_decay=0.003),
    dict(momentum=0.9, maximize=True),
    dict(weight_decay=0.01, grad_scale=mx.array(1024.0)),
    dict(momentum=0.7, dampening=0.25, maximize=True, grad_scale=mx.array(3.0)),
    dict(momentum=0.9, weight_decay=0.01, clip_factor=mx.array(0.37)),
]


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16], ids=str)
@pytest.mark.parametrize("kw", VARIANTS, ids=lambda k: ",".join(k) or "plain")
def test_fallback_matches_primitive(dtype, kw):
    keys = mx.random.split(mx.random.key(5), 9)
    shapes = [(7,), (3, 4), ()]
    params = [
        mx.random.normal(s, key=keys[i]).astype(dtype) for i, s in enumerate(shapes)
    ]
    grads = [
        mx.random.normal(s, key=keys[3 + i]).astype(dtype) for i, s in enumerate(shapes)
    ]
    vels = [
        mx.random.normal(s, key=keys[6 + i]).astype(dtype) for i, s in enumerate(shapes)
    ]
    lr = mx.array(0.03)
    fp, fv, _ = sgd_fallback(params, grads, vels, learning_rate=lr, **kw)
    kp, kv = mfs.sgd_update_many(params, grads, vels, learning_rate=lr, **kw)
    for a, b in zip(fp + fv, kp + kv):
        assert_bitwise_equal(a, b)
    step = mx.array(np.uint64(23))
    sched = mfs.step_decay(0.1, 0.9, 10)
    fp, fv, _ = sgd_fallback(
        params, grads, vels, step=step, init=0.1, decay_rate=0.9, step_size=10, **kw
    )
    kp, kv = mfs.sgd_update_many_scheduled(
        params, grads, vels, step=step, schedule=sched, **kw
    )
    for a, b in zip(fp + fv, kp + kv):
        assert_bitwise_equal(a, b)


@pytest.mark.parametrize("dtype", [mx.int32, mx.uint64, mx.int8], ids=str)
def test_step_decay_fallback_matches_primitive(dtype):
    steps = mx.arange(0, 100, dtype=dtype)
    sched = mfs.step_decay(0.1, 0.9, 7)
    assert_bitwise_equal(_ext._step_decay_lr_fallback(steps, 0.1, 0.9, 7), sched(steps))


def test_fallback_validates_like_the_primitive():
    with pytest.raises(ValueError, match="grad has shape"):
        sgd_fallback([mx.ones(3)], [mx.ones(4)], [], learning_rate=mx.array(0.1))


@pytest.mark.parametrize("skip", [False, True])
def test_fallback_skip_matches_primitive(skip):
    p = [mx.linspace(-1, 1, 9), mx.ones((2, 3), mx.bfloat16)]
    g = [mx.full((9,), 0.5), mx.full((2, 3), 2.0, mx.bfloat16)]
    v = [mx.full((9,), 0.25), mx.zeros((2, 3), mx.bfloat16)]
    flag = mx.array(skip)
    fp, fv, _ = sgd_fallback(
        p, g, v, learning_rate=mx.array(0.1), momentum=0.9, skip=flag
    )
    kp, kv = mfs.sgd_update_many(p, g, v, learning_rate=0.1, momentum=0.9, skip=flag)
    for a, b in zip(fp + fv, kp + kv):
        assert_bitwise_equal(a, b)
    if skip:
        for a, b in zip(kp + kv, p + v):
            assert_bitwise_equal(a, b)


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf")])
def test_grads_nonfinite_fallback_matches_primitive(bad):
    grads = [mx.ones((5,)), mx.zeros((3, 4), mx.float16).T, mx.full((7,), 2.0)]
    if bad is not None:
        grads.append(mx.array([1.0, bad]))
    a = _ext._grads_nonfinite_fallback(grads)
    b = mfs.grads_nonfinite(grads)
    assert a.dtype == b.dtype == mx.bool_
    assert a.item() == b.item() == (bad is not None)


def test_sq_norm_fallback_matches_primitive():
    grads = [
        mx.random.normal((1000,)),
        mx.random.normal((30, 40)).T,
        mx.ones((5,), mx.bfloat16),
    ]
    a = _ext._grads_sq_norm_fallback(grads).item()
    b = _ext.grads_sq_norm(grads).item()
    assert abs(a - b) <= 1e-5 * b


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16], ids=str)
def test_fallback_reads_broadcast_momentum_and_half_gradients_as_the_kernel(dtype):
    """A momentum buffer that broadcasts to its param (a stock checkpoint's)
    and a half gradient of a float32 param take the same checks and give the
    kernel's bits in the fallback too."""
    keys = mx.random.split(mx.random.key(8), 4)
    params = [mx.random.normal((3, 4), key=keys[0]).astype(dtype), mx.ones((5,))]
    grads = [
        mx.random.normal((3, 4), key=keys[1]).astype(dtype),
        mx.random.normal((5,), key=keys[2]).astype(mx.bfloat16),
    ]
    vels = [mx.random.normal((1, 4), key=keys[3]).astype(dtype), mx.zeros((5,))]
    kw = dict(learning_rate=mx.array(0.03), momentum=0.9, weight_decay=1e-2)
    fp, fv, _ = sgd_fallback(params, grads, vels, **kw)
    kp, kv = mfs.sgd_update_many(params, grads, vels, **kw)
    for a, b in zip(fp + fv, kp + kv):
        assert a.shape == b.shape
        assert_bitwise_equal(a, b)
    assert kv[0].shape == (3, 4)
