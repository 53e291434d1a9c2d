"""skip_nonfinite: a NaN or Inf in any gradient makes the whole step a no-op,
decided on the device (params, momentum buffers, step counter and learning
rate all unchanged)."""

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_fused_sgd as mfs

from helpers import assert_bitwise_equal


def _params():
    return {
        "w": mx.linspace(-1, 1, 12).reshape(3, 4),
        "layers": [{"b": mx.ones((300_001,)) * 0.5}, {"b": mx.full((5,), 2.0)}],
    }


def _grads(seed, bad=None):
    keys = mx.random.split(mx.random.key(seed), 3)
    g = {
        "w": mx.random.normal((3, 4), key=keys[0]),
        "layers": [
            {"b": mx.random.normal((300_001,), key=keys[1])},
            {"b": mx.random.normal((5,), key=keys[2])},
        ],
    }
    if bad is not None:
        host = np.array(g["layers"][0]["b"])
        host[123_456] = bad
        g["layers"][0]["b"] = mx.array(host)
    return g


def _flat(tree):
    return dict(tree_flatten(tree))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("lr", ["float", "step_decay"])
def test_bad_steps_are_skipped_and_good_ones_match_stock(bad, lr):
    make_lr = (
        (lambda m: 0.05) if lr == "float" else (lambda m: m.step_decay(0.1, 0.5, 2))
    )
    ours = mfs.FusedSGD(
        make_lr(mfs), momentum=0.9, weight_decay=1e-3, skip_nonfinite=True
    )
    stock = optim.SGD(make_lr(optim), momentum=0.9, weight_decay=1e-3)
    p_ours, p_stock = _params(), _params()
    plan = [None, bad, None, None, bad, bad, None]  # stock sees only the good ones
    for i, b in enumerate(plan):
        before = _flat(p_ours), _flat(ours.state)
        p_ours = ours.apply_gradients(_grads(i, b), p_ours)
        mx.eval(p_ours, ours.state)
        assert ours.last_step_skipped.item() == (b is not None)
        if b is not None:
            for k, v in _flat(p_ours).items():
                assert_bitwise_equal(v, before[0][k], k)
            for k, v in _flat(ours.state).items():
                if k != "last_step_skipped":  # the report of this step
                    assert_bitwise_equal(v, before[1][k], k)
        else:
            p_stock = stock.apply_gradients(_grads(i), p_stock)
            mx.eval(p_stock, stock.state)
    for k, v in _flat(p_ours).items():
        assert_bitwise_equal(v, _flat(p_stock)[k], k)
    assert ours.state["step"].item() == stock.state["step"].item() == 4
    assert_bitwise_equal(ours.state["learning_rate"], stock.state["learning_rate"])


def test_skipped_first_step_leaves_no_garbage_momentum():
    """PyTorch's fused SGD is reported to corrupt the momentum buffer on a
    skipped step; here a skipped first step leaves it at zeros."""
    opt = mfs.FusedSGD(0.1, momentum=0.9, skip_nonfinite=True)
    params = _params()
    params = opt.apply_gradients(_grads(0, np.nan), params)
    mx.eval(params, opt.state)
    assert opt.last_step_skipped.item()
    assert opt.state["step"].item() == 0
    for k, v in _flat(opt.state).items():
        if k.endswith(".v"):
            assert not np.any(np.array(v)), k
    for k, v in _flat(params).items():
        assert_bitwise_equal(v, _flat(_params())[k], k)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=str)
def test_half_precision_gradients_are_checked(dtype):
    opt = mfs.FusedSGD(0.1, momentum=0.9, skip_nonfinite=True)
    params = {"w": mx.ones((70,), dtype)}
    g = mx.ones((70,), dtype)
    bad = mx.concatenate([g[:69], mx.array([float("inf")], dtype)])
    params = opt.apply_gradients({"w": bad}, params)
    mx.eval(params)
    assert opt.last_step_skipped.item()
    assert np.array(params["w"].astype(mx.float32)).tolist() == [1.0] * 70
    params = opt.apply_gradients({"w": g}, params)
    mx.eval(params)
    assert not opt.last_step_skipped.item()


def test_with_grad_scale_the_scaled_gradients_are_checked():
    opt = mfs.FusedSGD(0.1, grad_scale=1024.0, skip_nonfinite=True)
    params = {"w": mx.ones((4,))}
    params = opt.apply_gradients({"w": mx.array([1.0, float("inf"), 1.0, 1.0])}, params)
    mx.eval(params)
    assert opt.last_step_skipped.item()
    params = opt.apply_gradients({"w": mx.full((4,), 1024.0)}, params)
    assert params["w"].tolist() == [0.9] * 4 or np.allclose(np.array(params["w"]), 0.9)
    assert not opt.last_step_skipped.item()


def test_without_the_option_nothing_is_skipped():
    opt = mfs.FusedSGD(0.1)
    params = opt.apply_gradients({"w": mx.array([float("nan")])}, {"w": mx.ones((1,))})
    mx.eval(params)
    assert np.isnan(np.array(params["w"])).all()
    assert not opt.last_step_skipped.item()


@pytest.mark.parametrize("chunk", [1, 2, 4, 100])
def test_grads_nonfinite_matches_numpy(chunk):
    rng = np.random.default_rng(0)
    for trial in range(20):
        arrays = []
        for n in rng.integers(0, 40, size=rng.integers(1, 7)):
            a = rng.normal(size=n).astype(np.float32)
            if n and rng.random() < 0.3:
                a[rng.integers(0, n)] = rng.choice([np.nan, np.inf, -np.inf])
            arrays.append(a)
        expected = any(not np.isfinite(a).all() for a in arrays)
        got = mfs.grads_nonfinite(
            [mx.array(a) for a in arrays], tensors_per_primitive=chunk
        )
        assert got.dtype == mx.bool_
        assert got.item() == expected, trial


def test_grads_nonfinite_non_contiguous_and_large():
    base = mx.zeros((600, 700))
    host = np.zeros((600, 700), np.float32)
    host[599, 4] = np.inf  # row 4 of the transpose: kept by [::2]
    view = mx.array(host).T[::2]  # strided
    assert mfs.grads_nonfinite([base, view]).item()
    assert not mfs.grads_nonfinite([base, base.T]).item()
    assert not mfs.grads_nonfinite([]).item()
    with pytest.raises(ValueError, match=r"grads\[1\] has dtype int32"):
        mfs.grads_nonfinite([base, mx.ones((2,), mx.int32)])


def test_skip_flag_must_be_a_boolean_scalar():
    with pytest.raises(ValueError, match="skip must be a boolean or integer scalar"):
        mfs.sgd_update(
            mx.ones(3), mx.ones(3), learning_rate=0.1, skip=mx.array([True, False])
        )
