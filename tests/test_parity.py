"""FusedSGD against stock mlx.optimizers.SGD on a real mlx.nn model."""

import mlx.core as mx
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten

import mlx_fused_sgd as mfs

from helpers import MLP, assert_bitwise_equal, train_steps


def _train(make_optimizer, steps=50, seed=0):
    mx.random.seed(seed)
    model = MLP()
    mx.eval(model.parameters())
    optimizer = make_optimizer()
    train_steps(model, optimizer, steps, mx.random.key(1234))
    return model, optimizer


CONFIGS = {
    "plain": dict(learning_rate=0.1),
    "momentum": dict(learning_rate=0.05, momentum=0.9),
    "momentum_weight_decay": dict(learning_rate=0.05, momentum=0.9, weight_decay=1e-2),
    "dampening": dict(learning_rate=0.05, momentum=0.8, dampening=0.3),
    "nesterov": dict(
        learning_rate=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3
    ),
    "weight_decay_only": dict(learning_rate=0.1, weight_decay=0.05),
    "float_lr_odd": dict(learning_rate=0.0123456789, momentum=0.33),
}


def _assert_same(model_a, opt_a, model_b, opt_b, momentum):
    pa = dict(tree_flatten(model_a.parameters()))
    pb = dict(tree_flatten(model_b.parameters()))
    assert pa.keys() == pb.keys()
    for k in pa:
        assert_bitwise_equal(pa[k], pb[k], f"param {k}")
    assert_bitwise_equal(opt_a.state["step"], opt_b.state["step"], "step")
    assert_bitwise_equal(
        opt_a.state["learning_rate"], opt_b.state["learning_rate"], "learning_rate"
    )
    sa = dict(tree_flatten(opt_a.state))
    sb = dict(tree_flatten(opt_b.state))
    if momentum:
        assert sa.keys() == sb.keys()
        for k in sa:
            assert_bitwise_equal(sa[k], sb[k], f"state {k}")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_float32_bit_identical_to_stock(name):
    kwargs = CONFIGS[name]
    model_f, opt_f = _train(lambda: mfs.FusedSGD(**kwargs))
    model_s, opt_s = _train(lambda: optim.SGD(**kwargs))
    _assert_same(model_f, opt_f, model_s, opt_s, kwargs.get("momentum", 0) > 0)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_step_decay_schedule_bit_identical(momentum):
    model_f, opt_f = _train(
        lambda: mfs.FusedSGD(
            mfs.step_decay(0.1, 0.9, 10), momentum=momentum, weight_decay=1e-4
        )
    )
    model_s, opt_s = _train(
        lambda: optim.SGD(
            optim.step_decay(0.1, 0.9, 10), momentum=momentum, weight_decay=1e-4
        )
    )
    _assert_same(model_f, opt_f, model_s, opt_s, momentum > 0)
    assert opt_f.state["step"].item() == 50


def test_other_schedule_bit_identical():
    make = lambda cls: cls(  # noqa: E731
        optim.cosine_decay(0.1, 40, 1e-3), momentum=0.9, nesterov=True
    )
    model_f, opt_f = _train(lambda: make(mfs.FusedSGD))
    model_s, opt_s = _train(lambda: make(optim.SGD))
    _assert_same(model_f, opt_f, model_s, opt_s, True)


def test_parity_is_not_vacuous():
    """A different hyperparameter must show up as a difference."""
    model_f, opt_f = _train(lambda: mfs.FusedSGD(0.05, momentum=0.9))
    model_s, opt_s = _train(lambda: optim.SGD(0.05, momentum=0.91))
    with pytest.raises(AssertionError, match="differ"):
        _assert_same(model_f, opt_f, model_s, opt_s, True)


def test_learning_rate_setter_like_stock():
    a, b = mfs.FusedSGD(0.1, momentum=0.5), optim.SGD(0.1, momentum=0.5)
    for opt in (a, b):
        opt.learning_rate = 0.025
    assert_bitwise_equal(a.learning_rate, b.learning_rate)
    params = {"w": mx.arange(6, dtype=mx.float32).reshape(2, 3)}
    grads = {"w": mx.full((2, 3), 0.5)}
    pa = a.apply_gradients(grads, params)
    pb = b.apply_gradients(grads, params)
    assert_bitwise_equal(pa["w"], pb["w"])


def test_apply_gradients_on_lists_tuples_and_superset_params():
    params = {
        "a": [mx.ones((3,)), (mx.full((2, 2), 2.0), mx.zeros((1,)))],
        "b": mx.ones((4,)),
        "unused": mx.ones((5,)),
    }
    grads = {
        "a": [mx.full((3,), 0.1), (mx.ones((2, 2)), mx.ones((1,)))],
        "b": mx.ones((4,)),
    }
    fa = mfs.FusedSGD(0.5, momentum=0.9)
    sa = optim.SGD(0.5, momentum=0.9)
    for _ in range(3):
        out_f = fa.apply_gradients(grads, params)
        out_s = sa.apply_gradients(grads, params)
    assert isinstance(out_f["a"][1], tuple)
    assert "unused" not in out_f
    ff, fs = dict(tree_flatten(out_f)), dict(tree_flatten(out_s))
    assert ff.keys() == fs.keys()
    for k in ff:
        assert_bitwise_equal(ff[k], fs[k], k)


def test_constructor_validation_like_stock():
    for cls in (mfs.FusedSGD, optim.SGD):
        with pytest.raises(ValueError, match="Nesterov momentum requires"):
            cls(0.1, nesterov=True)
        with pytest.raises(ValueError, match="Nesterov momentum requires"):
            cls(0.1, momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(ValueError, match="momentum must be"):
        mfs.FusedSGD(0.1, momentum=-0.5)
    with pytest.raises(ValueError, match="dampening must be in"):
        mfs.FusedSGD(0.1, momentum=0.5, dampening=1.5)
    with pytest.raises(ValueError, match="weight_decay must be"):
        mfs.FusedSGD(0.1, weight_decay=float("nan"))


def test_state_layout_matches_stock():
    model = MLP()
    f, s = mfs.FusedSGD(0.1, momentum=0.9), optim.SGD(0.1, momentum=0.9)
    f.init(model.trainable_parameters())
    s.init(model.trainable_parameters())
    kf = [k for k, _ in tree_flatten(f.state)]
    ks = [k for k, _ in tree_flatten(s.state)]
    assert kf == ks
    assert f.state["step"].dtype == mx.uint64


def test_works_inside_multi_optimizer():
    """MultiOptimizer drives each optimizer's apply_gradients on its part."""
    params = {"a": mx.ones((4,)), "b": {"c": mx.full((3,), 2.0)}}
    grads = {"a": mx.full((4,), 0.5), "b": {"c": mx.ones((3,))}}

    def make(cls):
        return optim.MultiOptimizer(
            [cls(0.1, momentum=0.9), optim.Adam(1e-2)],
            [lambda name, _: name.startswith("a")],
        )

    ours, stock = make(mfs.FusedSGD), make(optim.SGD)
    for _ in range(3):
        pa = ours.apply_gradients(grads, params)
        pb = stock.apply_gradients(grads, params)
    fa, fb = dict(tree_flatten(pa)), dict(tree_flatten(pb))
    assert fa.keys() == fb.keys()
    for k in fa:
        assert_bitwise_equal(fa[k], fb[k], k)
