"""Donated buffers: updates happen in place when nothing else reads the old
arrays, and never when something does."""

import mlx.core as mx
import numpy as np

import mlx_fused_sgd as mfs

from helpers import assert_bitwise_equal


def test_held_reference_is_never_overwritten():
    p = mx.arange(64, dtype=mx.float32)
    mx.eval(p)
    before = np.array(p)
    new_p, _ = mfs.sgd_update(p, mx.ones(64), learning_rate=0.5)
    mx.eval(new_p)
    assert np.array_equal(np.array(p), before)
    assert not np.array_equal(np.array(new_p), before)


def test_update_is_correct_when_buffers_are_donated():
    p = mx.random.normal((1000,))
    g = mx.random.normal((1000,))
    v = mx.random.normal((1000,))
    mx.eval(p, g, v)
    exp_p, exp_v = mfs.sgd_update(p, g, v, learning_rate=0.1, momentum=0.9)
    mx.eval(exp_p, exp_v)
    # Copies that only the graph references, so they are donated.
    p2, g2, v2 = p * 1, g * 1, v * 1
    new_p, new_v = mfs.sgd_update(p2, g2, v2, learning_rate=0.1, momentum=0.9)
    del p2, g2, v2
    mx.eval(new_p, new_v)
    assert_bitwise_equal(new_p, exp_p)
    assert_bitwise_equal(new_v, exp_v)
