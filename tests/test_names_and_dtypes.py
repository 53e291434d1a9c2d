"""Errors name the parameter by its path in the tree; the gradient dtypes
stock accepts are accepted, with stock's bits; integer params are refused
by name. Every refused step leaves params and state as they were."""

import re
import warnings

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten, tree_map

import mlx_fused_sgd as mfs

from helpers import assert_bitwise_equal, sgd_fallback


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
    # (A missing buffer is started at zeros, as stock's init would:
    # tests/test_state_changes.py.) A per-parameter state that is no dict:
    opt.state["layers"][4]["weight"] = [mx.zeros((2, 8))]
    _refused(
        opt, params, _grads_like(params), r"state for parameter 'layers\.4\.weight'"
    )
    opt.state["layers"][4]["weight"] = {}
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


_NO_DECAY = [
    {},
    {"momentum": 0.9},
    {"momentum": 0.9, "nesterov": True},
    {"momentum": 0.7, "dampening": 0.3},
]
_NO_DECAY_IDS = ["plain", "momentum", "nesterov", "dampening"]


def _step_both(ours, stock, ours_p, stock_p, grads_of_step, steps, match=None):
    """``steps`` updates of FusedSGD and stock on the gradients
    ``grads_of_step(step)``: the first FusedSGD update must warn (``match``),
    no later one. Returns both params."""
    for step in range(steps):
        grads = grads_of_step(step)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ours_p = ours.apply_gradients(grads, ours_p)
        messages = [str(w.message) for w in caught]
        assert len(messages) == (1 if step == 0 else 0), messages
        if step == 0 and match:
            assert re.search(match, messages[0]), messages[0]
        stock_p = stock.apply_gradients(grads, stock_p)
        mx.eval(ours_p, stock_p, ours.state, stock.state)
    return ours_p, stock_p


def _assert_trees_equal(ours, stock):
    ours, stock = _flat(ours), _flat(stock)
    assert ours.keys() == stock.keys()
    for k, v in stock.items():
        assert ours[k].dtype == v.dtype, (k, ours[k].dtype, v.dtype)
        assert_bitwise_equal(ours[k], v, k)


@pytest.mark.parametrize("grad_dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("options", _NO_DECAY, ids=_NO_DECAY_IDS)
def test_without_weight_decay_half_gradients_give_stock_bits(grad_dtype, options):
    """Without weight decay stock computes the update of a float32 param from
    a half gradient in the gradient's dtype (a half momentum buffer, the
    learning rate and each product rounded to it): FusedSGD gives its bits,
    its state's dtypes, and says that these params are not fused. Params
    with float32 gradients in the same tree keep the fused float32 update."""
    params = _model_tree()
    ours = mfs.FusedSGD(mfs.step_decay(0.1, 0.5, 2), **options)
    stock = optim.SGD(optim.step_decay(0.1, 0.5, 2), **options)

    def grads_of_step(step):
        grads = _grads_like(params, seed=20 + step)
        for layer in grads["layers"][:2]:
            for k in layer:
                layer[k] = layer[k].astype(grad_dtype)
        return grads

    ours_p, stock_p = _step_both(
        ours, stock, params, params, grads_of_step, 5, r"params 'layers\.0\.weight'"
    )
    _assert_trees_equal(ours_p, stock_p)
    if options:
        _assert_trees_equal(ours.state, stock.state)
    assert _flat(ours_p)["layers.0.weight"].dtype == mx.float32


@pytest.mark.parametrize("grad_dtype", [mx.float16, mx.bfloat16])
def test_half_gradient_options_act_on_the_gradient_first(grad_dtype):
    """grad_scale (a power of two, exact), maximize and a skipped step with
    the update in the gradient's dtype: stock's bits on the unscaled,
    un-negated gradients, and a skipped step changes nothing."""
    params = _model_tree()
    opts = {"momentum": 0.9, "nesterov": True}
    ours = mfs.FusedSGD(
        0.1, grad_scale=1024.0, maximize=True, skip_nonfinite=True, **opts
    )
    stock = optim.SGD(0.1, **opts)
    ours_p = stock_p = params
    for step in range(4):
        grads = tree_map(lambda g: g.astype(grad_dtype), _grads_like(params, 30 + step))
        scaled = tree_map(lambda g: -(g * 1024), grads)
        if step == 0:
            with pytest.warns(UserWarning):
                ours_p = ours.apply_gradients(scaled, ours_p)
        else:
            ours_p = ours.apply_gradients(scaled, ours_p)
        stock_p = stock.apply_gradients(grads, stock_p)
        mx.eval(ours_p, stock_p, ours.state)
        if step == 1:
            before_p, before_s = _flat(ours_p), _flat(ours.state)
            bad = tree_map(lambda g: g, scaled)
            bad["layers"][0]["bias"] = mx.full((8,), float("inf"), grad_dtype)
            skipped = ours.apply_gradients(bad, ours_p)
            mx.eval(skipped, ours.state)
            assert ours.state["last_step_skipped"].item()
            for k, v in before_p.items():
                assert_bitwise_equal(_flat(skipped)[k], v, k)
            for k, v in _flat(ours.state).items():
                if k.endswith(".v"):
                    assert_bitwise_equal(v, before_s[k], k)
    _assert_trees_equal(ours_p, stock_p)
    for k, v in _flat(stock.state).items():
        if k.endswith(".v"):
            assert_bitwise_equal(_flat(ours.state)[k], v, k)


def test_stock_checkpoint_with_half_buffers_resumes_with_stock_bits():
    params = _model_tree()
    half = lambda t: tree_map(lambda g: g.astype(mx.float16), t)  # noqa: E731
    stock = optim.SGD(0.1, momentum=0.9)
    p = stock.apply_gradients(half(_grads_like(params, 40)), params)
    mx.eval(p, stock.state)
    ours = mfs.FusedSGD(0.1, momentum=0.9)
    ours.state = tree_map(lambda x: x, stock.state)
    assert _flat(ours.state)["layers.0.weight.v"].dtype == mx.float16
    ours_p, stock_p = _step_both(
        ours, stock, p, p, lambda k: half(_grads_like(params, 41 + k)), 3, "stock's ops"
    )
    _assert_trees_equal(ours_p, stock_p)
    _assert_trees_equal(ours.state, stock.state)


def test_state_dtype_float32_keeps_float32_buffers_for_half_gradients():
    """state_dtype=float32 keeps the buffer float32: stock's arithmetic with
    a float32 buffer (the learning rate still rounded to the gradient's
    dtype)."""
    params = _model_tree()
    half = lambda t: tree_map(lambda g: g.astype(mx.bfloat16), t)  # noqa: E731
    ours = mfs.FusedSGD(0.1, momentum=0.9, state_dtype=mx.float32)
    stock = optim.SGD(0.1, momentum=0.9)
    stock.init(params)  # float32 buffers, from the params
    ours_p, stock_p = _step_both(
        ours, stock, params, params, lambda k: half(_grads_like(params, 50 + k)), 3
    )
    _assert_trees_equal(ours_p, stock_p)
    _assert_trees_equal(ours.state, stock.state)
    assert _flat(ours.state)["layers.0.weight.v"].dtype == mx.float32


@pytest.mark.parametrize("buffer_dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("grad_dtype", [mx.float32, mx.bfloat16])
def test_a_half_buffer_of_a_float32_param_is_widened_as_stock(buffer_dtype, grad_dtype):
    """A float16/bfloat16 buffer of a float32 param, with weight decay or
    float32 gradients: stock's ops widen it, and so does the update (kernel
    path and composed fallback), with stock's bits."""
    keys = mx.random.split(mx.random.key(5), 3)
    p = mx.random.normal((6, 4), key=keys[0])
    g = mx.random.normal((6, 4), key=keys[1]).astype(grad_dtype)
    v = mx.random.normal((6, 4), key=keys[2]).astype(buffer_dtype)
    options = dict(momentum=0.9, weight_decay=1e-2)
    state = {"v": v}
    expected = optim.SGD(0.1, **options).apply_single(g, p, state)
    kw = dict(learning_rate=mx.array(0.1), **options)
    kp, kv = mfs.sgd_update_many([p], [g], [v], **kw)
    fp, fv, _ = sgd_fallback([p], [g], [v], **kw)
    for got, vel in ((kp[0], kv[0]), (fp[0], fv[0])):
        assert_bitwise_equal(got, expected, "param")
        assert_bitwise_equal(vel, state["v"], "buffer")
        assert vel.dtype == mx.float32


@pytest.mark.parametrize("grad_dtype", [mx.float16, mx.bfloat16])
@pytest.mark.parametrize("options", _NO_DECAY, ids=_NO_DECAY_IDS)
def test_functional_half_gradient_without_decay_gives_stock_bits(grad_dtype, options):
    """The ops, kernel path and composed fallback, against stock's
    apply_single, with and without a given buffer."""
    keys = mx.random.split(mx.random.key(11), 3)
    p = mx.random.normal((9, 5), key=keys[0])
    g = mx.random.normal((5, 9), key=keys[1]).T.astype(grad_dtype)
    v = mx.random.normal((9, 5), key=keys[2]).astype(grad_dtype)
    momentum = options.get("momentum", 0.0) > 0
    stock = optim.SGD(0.1, **options)
    state = {"v": v}
    expected = stock.apply_single(g, p, state)
    given = [v] if momentum else []
    kw = dict(learning_rate=mx.array(0.1), **options)
    kp, kv = mfs.sgd_update_many([p], [g], given, **kw)
    fp, fv, _ = sgd_fallback([p], [g], given, **kw)
    for got in (kp[0], fp[0]):
        assert got.dtype == mx.float32
        assert_bitwise_equal(got, expected, "param")
    if momentum:
        for got in (kv[0], fv[0]):
            assert got.dtype == grad_dtype
            assert_bitwise_equal(got, state["v"], "velocity")
        # No buffer given: stock's zeros of the gradient's dtype.
        fresh = {"v": mx.zeros(g.shape, grad_dtype)}
        expected = stock.apply_single(g, p, fresh)
        kp, kv = mfs.sgd_update_many([p], [g], [], **kw)
        assert_bitwise_equal(kp[0], expected, "param")
        assert kv[0].dtype == grad_dtype
        assert_bitwise_equal(kv[0], fresh["v"], "velocity")


def test_functional_widens_a_half_gradient_exactly_with_weight_decay():
    p = mx.array([1.0, -2.0, 3.5])
    g16 = mx.array([0.1, 0.2, -0.3], mx.float16)
    kw = dict(learning_rate=0.1, weight_decay=1e-2)
    widened = mfs.sgd_update(p, g16.astype(mx.float32), **kw)
    as_given = mfs.sgd_update(p, g16, **kw)
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


def test_after_an_explicit_init_half_gradients_still_give_stock_bits_and_warn():
    """``init(params)`` first (as stock's own init from params): float32
    buffers on both sides, stock's arithmetic with them, and the warning
    still comes at the first update, once."""
    params = _model_tree()
    half = lambda t: tree_map(lambda g: g.astype(mx.float16), t)  # noqa: E731
    ours = mfs.FusedSGD(0.1, momentum=0.9)
    stock = optim.SGD(0.1, momentum=0.9)
    ours.init(params)
    stock.init(params)
    ours_p, stock_p = _step_both(
        ours, stock, params, params, lambda k: half(_grads_like(params, 60 + k)), 3
    )
    _assert_trees_equal(ours_p, stock_p)
    _assert_trees_equal(ours.state, stock.state)
    assert _flat(ours.state)["layers.0.weight.v"].dtype == mx.float32
