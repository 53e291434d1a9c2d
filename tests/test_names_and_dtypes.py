"""Errors name the parameter by its path in the tree; the gradient dtypes
stock accepts are accepted, with stock's bits; integer params are refused
by name. Every refused step leaves params and state as they were."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten, tree_map

import mlx_fused_sgd as mfs

from conftest import assert_bitwise_equal


def _model_tree():
    mx.random.seed(3)
    model = nn.Sequential(
        nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)
    )
    return model.trainable_parameters()


def _grads_like(params, seed=4):
    mx.random.seed(seed)
    return tree_map(lambda p: mx.random.normal(p.shape), params)


def _flat(tree):
    return dict(tree_flatten(tree))


def _refused(opt, params, grads, match):
    before_state = _flat(opt.state)
    before_params = _flat(params)
    with pytest.raises(ValueError, match=match) as info:
        opt.apply_gradients(grads, params)
    assert "[" not in str(info.value), str(info.value)  # no bare indices
    assert _flat(opt.state).keys() == before_state.keys()
    for k, v in before_state.items():
        assert_bitwise_equal(_flat(opt.state)[k], v, k)
    for k, v in before_params.items():
        assert_bitwise_equal(_flat(params)[k], v, k)
    return str(info.value)


@pytest.mark.parametrize("first_step", [True, False])
def test_shape_error_names_the_path(first_step):
    params = _model_tree()
    opt = mfs.FusedSGD(0.1, momentum=0.9)
    if not first_step:
        params = opt.apply_gradients(_grads_like(params), params)
        mx.eval(params, opt.state)
    grads = _grads_like(params)
    grads["layers"][2]["bias"] = mx.ones((9,))
    _refused(
        opt,
        params,
        grads,
        r"gradient 'layers\.2\.bias' has shape \(9,\) but param "
        r"'layers\.2\.bias' has shape \(8,\)",
    )


@pytest.mark.parametrize(
    "options",
    [{}, {"max_grad_norm": 1.0}, {"skip_nonfinite": True}],
    ids=["plain", "clip", "skip"],
)
def test_integer_params_are_refused_by_name(options):
    params = {"emb": mx.ones((3,)), "counts": {"n": mx.arange(4)}}
    grads = {"emb": mx.ones((3,)), "counts": {"n": mx.ones((4,), mx.int32)}}
    opt = mfs.FusedSGD(0.1, momentum=0.9, **options)
    message = _refused(opt, params, grads, r"'counts\.n'")
    assert "int32" in message


def test_state_errors_name_the_path():
    params = _model_tree()
    opt = mfs.FusedSGD(0.1, momentum=0.9)
    opt.init(params)
    opt.state["layers"][4]["weight"]["v"] = mx.zeros((3, 3))
    _refused(
        opt,
        params,
        _grads_like(params),
        r"momentum buffer 'layers\.4\.weight' has shape \(3, 3\) but param "
        r"'layers\.4\.weight' has shape \(2, 8\)",
    )
    del opt.state["layers"][4]["weight"]["v"]
    _refused(opt, params, _grads_like(params), r"'v' for parameter 'layers\.4\.weight'")
    del opt.state["layers"][4]["bias"]
    _refused(opt, params, _grads_like(params), r"parameter 'layers\.4\.bias'")


def test_a_single_tensor_tree_is_named_too():
    opt = mfs.FusedSGD(0.1)
    _refused(
        opt,
        {"only": mx.ones((2,))},
        {"only": mx.ones((3,))},
        r"gradient 'only' has shape \(3,\) but param 'only' has shape \(2,\)",
    )


@pytest.mark.parametrize("grad_dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize(
    "options",
    [
        {"weight_decay": 1e-2},
        {"momentum": 0.9, "weight_decay": 1e-2},
        {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-4},
        {"momentum": 0.8, "dampening": 0.1, "weight_decay": 1e-3},
    ],
    ids=["plain", "momentum", "nesterov", "dampening"],
)
def test_half_gradients_of_float32_params_give_stock_bits(grad_dtype, options):
    """With weight decay, stock's gradient is float32 from its first op on
    (g + wd * p): the widened gradient gives its bits."""
    params = _model_tree()
    ours_p, stock_p = params, params
    ours = mfs.FusedSGD(mfs.step_decay(0.1, 0.5, 2), **options)
    stock = optim.SGD(optim.step_decay(0.1, 0.5, 2), **options)
    for step in range(4):
        grads = tree_map(
            lambda g: g.astype(grad_dtype), _grads_like(params, seed=10 + step)
        )
        ours_p = ours.apply_gradients(grads, ours_p)
        stock_p = stock.apply_gradients(grads, stock_p)
        mx.eval(ours_p, stock_p, ours.state, stock.state)
    for k, v in _flat(stock_p).items():
        assert _flat(ours_p)[k].dtype == mx.float32
        assert_bitwise_equal(_flat(ours_p)[k], v, k)
    for k, v in _flat(ours.state).items():  # stock keeps a "v" without momentum
        assert_bitwise_equal(v, _flat(stock.state)[k], k)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_without_weight_decay_half_gradients_compute_in_float32(momentum):
    """Without weight decay stock rounds the learning rate (and, without
    momentum, lr * g) to the gradient's half precision; FusedSGD computes in
    float32: the bits of the float32 gradient (documented)."""
    params = _model_tree()
    grads = _grads_like(params)
    half = tree_map(lambda g: g.astype(mx.float16), grads)
    wide = tree_map(lambda g: g.astype(mx.float32), half)
    a = mfs.FusedSGD(0.1, momentum=momentum).apply_gradients(half, params)
    b = mfs.FusedSGD(0.1, momentum=momentum).apply_gradients(wide, params)
    for k, v in _flat(b).items():
        assert_bitwise_equal(_flat(a)[k], v, k)


def test_functional_widens_a_half_gradient_exactly():
    p = mx.array([1.0, -2.0, 3.5])
    g16 = mx.array([0.1, 0.2, -0.3], mx.float16)
    widened = mfs.sgd_update(p, g16.astype(mx.float32), learning_rate=0.1)
    as_given = mfs.sgd_update(p, g16, learning_rate=0.1)
    assert_bitwise_equal(as_given[0], widened[0], "param")


@pytest.mark.parametrize(
    "param_dtype, grad_dtype",
    [
        (mx.float16, mx.float32),
        (mx.bfloat16, mx.float32),
        (mx.bfloat16, mx.float16),
        (mx.float16, mx.bfloat16),
    ],
)
def test_wider_or_other_half_gradients_are_refused(param_dtype, grad_dtype):
    """Stock would promote the param itself to another dtype."""
    params = {"w": mx.ones((4,), param_dtype)}
    grads = {"w": mx.ones((4,), grad_dtype)}
    message = _refused(mfs.FusedSGD(0.1, momentum=0.9), params, grads, r"'w'")
    assert "must have it" in message
