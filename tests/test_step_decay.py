import math

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest

import mlx_fused_sgd as mfs

from helpers import assert_bitwise_equal

INT_DTYPES = [
    mx.int8,
    mx.int16,
    mx.int32,
    mx.int64,
    mx.uint8,
    mx.uint16,
    mx.uint32,
    mx.uint64,
]
LIMITS = {
    mx.int8: 127,
    mx.int16: 32767,
    mx.int32: 2**31 - 1,
    mx.int64: 2**63 - 1,
    mx.uint8: 255,
    mx.uint16: 65535,
    mx.uint32: 2**32 - 1,
    mx.uint64: 2**64 - 1,
}
SCHEDULES = [(0.1, 0.9, 10), (1e-1, 0.5, 1), (3.0, 0.99, 1000), (0.7, 1.3, 7)]


def _steps_for(dtype):
    hi = LIMITS[dtype]
    steps = [0, 1, 9, 10, 11, 19, 20, 21, 99, 100, 101, 126, 127]
    steps += [255, 1000, 65535, 2**24, 2**24 + 1, 2**31 - 1, 2**32 - 1, 2**40]
    steps += [2**53 + 1, 2**63 - 1, 2**64 - 1]
    return sorted({s for s in steps if s <= hi})


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
@pytest.mark.parametrize("init,decay_rate,step_size", SCHEDULES)
def test_bit_identical_to_stock(dtype, init, decay_rate, step_size):
    if step_size > LIMITS[dtype]:
        pytest.skip("stock refuses a step_size the step dtype cannot hold")
    # Through NumPy: mx.array cannot parse Python ints above 2**63 - 1.
    np_dtype = np.dtype(str(dtype).split(".")[-1])
    steps = mx.array(np.array(_steps_for(dtype), dtype=np_dtype))
    assert steps.dtype == dtype
    ours = mfs.step_decay(init, decay_rate, step_size)(steps)
    stock = optim.step_decay(init, decay_rate, step_size)(steps)
    assert ours.dtype == mx.float32
    assert_bitwise_equal(ours, stock, f"{dtype} {init},{decay_rate},{step_size}")


@pytest.mark.parametrize("dtype", [mx.int8, mx.int32, mx.int64], ids=str)
def test_negative_steps_floor_like_stock(dtype):
    steps = mx.array([-1, -9, -10, -11, -21], dtype)
    ours = mfs.step_decay(0.1, 0.9, 10)(steps)
    stock = optim.step_decay(0.1, 0.9, 10)(steps)
    assert_bitwise_equal(ours, stock)


@pytest.mark.parametrize("shape", [(), (1,), (3, 4), (2, 3, 5)])
def test_any_shape_and_strided_input(shape):
    n = math.prod(shape)
    steps = mx.arange(0, 7 * n, 7, dtype=mx.uint64).reshape(shape)
    sched = mfs.step_decay(0.1, 0.9, 3)
    assert_bitwise_equal(sched(steps), optim.step_decay(0.1, 0.9, 3)(steps))
    if len(shape) >= 2:
        t = steps.T  # not row-contiguous
        assert_bitwise_equal(sched(t), optim.step_decay(0.1, 0.9, 3)(t))


def test_python_int_step_gives_the_same_python_float():
    for step in [0, 9, 10, 11, 20, 21, 12345, 2**40]:
        ours = mfs.step_decay(0.1, 0.9, 10)(step)
        stock = optim.step_decay(0.1, 0.9, 10)(step)
        assert type(ours) is float
        assert ours == stock


def test_stock_docstring_example_with_fused_sgd():
    lr_schedule = mfs.step_decay(1e-1, 0.9, 10)
    optimizer = mfs.FusedSGD(learning_rate=lr_schedule)
    assert repr(optimizer.learning_rate) == "array(0.1, dtype=float32)"
    for _ in range(21):
        optimizer.update({}, {})
    assert repr(optimizer.learning_rate) == "array(0.081, dtype=float32)"


def test_stock_docstring_example_with_stock_sgd():
    optimizer = optim.SGD(learning_rate=mfs.step_decay(1e-1, 0.9, 10))
    assert repr(optimizer.learning_rate) == "array(0.1, dtype=float32)"
    for _ in range(21):
        optimizer.update({}, {})
    assert repr(optimizer.learning_rate) == "array(0.081, dtype=float32)"


def test_exposes_its_numbers():
    s = mfs.step_decay(0.25, 0.5, 4)
    assert (s.init, s.decay_rate, s.step_size) == (0.25, 0.5, 4)
    assert "step_size=4" in repr(s)


@pytest.mark.parametrize("step_size", [0, -3])
def test_step_size_below_one_raises_like_stock(step_size):
    with pytest.raises(ValueError, match="step_size must be greater than 0"):
        mfs.step_decay(0.1, 0.9, step_size)
    with pytest.raises(ValueError, match="step_size must be greater than 0"):
        optim.step_decay(0.1, 0.9, step_size)


def test_bad_numbers_are_refused():
    with pytest.raises(TypeError, match="step_size must be an int"):
        mfs.step_decay(0.1, 0.9, 2.5)
    with pytest.raises(ValueError, match="init must be a finite number"):
        mfs.step_decay(float("nan"), 0.9, 10)
    with pytest.raises(ValueError, match="decay_rate must be a finite number"):
        mfs.step_decay(0.1, float("inf"), 10)


def test_bad_steps_are_refused():
    s = mfs.step_decay(0.1, 0.9, 1000)
    with pytest.raises(ValueError, match="integer array"):
        s(mx.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="does not fit"):
        s(mx.array([1, 2], mx.int8))
    with pytest.raises(TypeError, match="step must be an integer"):
        s(2.0)


def test_not_differentiable_but_vmappable():
    s = mfs.step_decay(0.1, 0.9, 2)
    steps = mx.array([[0, 1, 2], [3, 4, 5]], mx.int32)
    out = mx.vmap(s)(steps)
    assert_bitwise_equal(out, optim.step_decay(0.1, 0.9, 2)(steps))
