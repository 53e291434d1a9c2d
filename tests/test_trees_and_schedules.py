"""Trees and schedules as users write them: namedtuple gradient trees, step
decay subclasses, the optimizer state kept as one object, hyperparameter
types checked like stock's."""

import collections
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten

import mlx_fused_sgd as mfs

from helpers import assert_bitwise_equal

Pair = collections.namedtuple("Pair", ["w", "b"])


def _tree(seed):
    k1, k2, k3 = mx.random.split(mx.random.key(seed), 3)
    return {
        "layer": Pair(mx.random.normal((5, 3), key=k1), mx.random.normal((3,), key=k2)),
        "head": [mx.random.normal((4,), key=k3)],
    }


def test_namedtuple_trees_like_stock():
    """Stock's tree_map rebuilds namedtuples; so does FusedSGD, step after
    step, with stock's bits (the result used to fail after the commit)."""
    params_f = params_s = _tree(0)
    fused, stock = mfs.FusedSGD(0.1), optim.SGD(0.1)
    for step in range(3):
        grads = _tree(10 + step)
        params_f = fused.apply_gradients(grads, params_f)
        params_s = stock.apply_gradients(grads, params_s)
        mx.eval(params_f, params_s)
        assert type(params_f["layer"]) is Pair
        assert fused.state["step"].item() == step + 1
    for (k, a), (_, b) in zip(tree_flatten(params_f), tree_flatten(params_s)):
        assert_bitwise_equal(a, b, k)


def test_namedtuple_trees_with_momentum():
    params = _tree(0)
    opt = mfs.FusedSGD(0.1, momentum=0.9)
    for step in range(2):
        params = opt.apply_gradients(_tree(5 + step), params)
        mx.eval(params, opt.state)
    assert type(params["layer"]) is Pair
    assert opt.state["step"].item() == 2


class WarmupStepDecay(mfs.StepDecay):
    """Step decay after a linear warm-up: a subclass overriding __call__."""

    def __call__(self, step):
        warm = mx.minimum((mx.array(step).astype(mx.float32) + 1) / 4, 1.0)
        return warm * super().__call__(step)


def test_step_decay_subclass_is_evaluated_not_folded():
    """Only exactly step decay is folded into the kernel; a subclass's own
    __call__ sets the learning rate (bit-identical to stock calling it)."""
    params_f = params_s = {"w": mx.ones((6,))}
    fused = mfs.FusedSGD(WarmupStepDecay(0.1, 0.5, 2), momentum=0.9)
    stock = optim.SGD(WarmupStepDecay(0.1, 0.5, 2), momentum=0.9)
    for step in range(6):
        grads = {"w": mx.full((6,), float(step + 1))}
        params_f = fused.apply_gradients(grads, params_f)
        params_s = stock.apply_gradients(grads, params_s)
        mx.eval(params_f, params_s, fused.state, stock.state)
        assert_bitwise_equal(params_f["w"], params_s["w"], f"step {step}")
        assert_bitwise_equal(
            fused.state["learning_rate"], stock.state["learning_rate"], "lr"
        )


def test_refused_first_step_keeps_the_state_object():
    """MLX's compile idiom holds optimizer.state; a refused first step rolls
    back in place, and the compiled step then works."""
    model = nn.Linear(3, 2)
    mx.eval(model.parameters())
    opt = mfs.FusedSGD(0.1, momentum=0.9)
    state_before = opt.state
    keys_before = set(opt.state)
    bad = {"weight": mx.ones((7, 7)), "bias": mx.ones((2,))}
    with pytest.raises(ValueError):
        opt.update(model, bad)
    assert opt.state is state_before
    assert set(opt.state) == keys_before  # no momentum buffers initialized
    assert opt.state["step"].item() == 0

    state = [model.state, opt.state]
    x = mx.ones((4, 3))
    loss_and_grad = nn.value_and_grad(model, lambda m: m(x).sum())

    @partial(mx.compile, inputs=state, outputs=state)
    def step():
        loss, grads = loss_and_grad(model)
        opt.update(model, grads)
        return loss

    for _ in range(2):
        mx.eval(step(), model.state, opt.state)
    assert opt.state is state_before
    assert opt.state["step"].item() == 2


@pytest.mark.parametrize("name", ["momentum", "weight_decay", "dampening"])
@pytest.mark.parametrize("value", ["0.1", None, [0.1], True])
def test_hyperparameters_must_be_numbers(name, value):
    with pytest.raises(TypeError, match=name):
        mfs.FusedSGD(0.1, **{name: value})


def test_scalar_array_hyperparameters_accepted():
    opt = mfs.FusedSGD(0.1, momentum=mx.array(0.9), weight_decay=mx.array(1e-3))
    params = opt.apply_gradients({"w": mx.ones((3,))}, {"w": mx.ones((3,))})
    mx.eval(params)
    assert opt.state["step"].item() == 1


# The tree walk, the result tree and the commit run in C++ for the trees MLX
# builds (plain dicts, nn.Module, lists, tuples); anything else falls back to
# the Python walk, which also names the parameter of every error.


def _model():
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _model_grads(model):
    x = mx.random.normal((4, 6), key=mx.random.key(3))
    return nn.value_and_grad(model, lambda m, x: m(x).sum())(model, x)[1]


def test_model_trees_take_the_cxx_walk(monkeypatch):
    """optimizer.update(model, grads) (the parameters are the nn.Module
    itself, lists inside) never runs the Python walk or rebuild: a slow
    path taken by mistake fails here."""
    from mlx_fused_sgd import optimizer as opt_module

    model = _model()
    opt = mfs.FusedSGD(0.1, momentum=0.9, weight_decay=1e-4)
    opt.init(model.trainable_parameters())

    def refuse(*args, **kwargs):
        raise AssertionError("the Python tree walk ran")

    monkeypatch.setattr(opt_module, "_collect", refuse)
    monkeypatch.setattr(opt_module, "_rebuild", refuse)
    stock_model = _model()
    stock_model.update(model.parameters())
    stock = optim.SGD(0.1, momentum=0.9, weight_decay=1e-4)
    for _ in range(3):
        grads = _model_grads(model)
        opt.update(model, grads)
        stock.update(stock_model, grads)
        mx.eval(model.parameters(), stock_model.parameters(), opt.state)
    for (k, a), (_, b) in zip(
        tree_flatten(model.parameters()), tree_flatten(stock_model.parameters())
    ):
        assert_bitwise_equal(a, b, k)
    for (k, a), (_, b) in zip(tree_flatten(opt.state), tree_flatten(stock.state)):
        assert_bitwise_equal(a, b, k)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_cxx_walk_matches_the_python_walk(momentum):
    """The same leaves, params, state dicts and buffers, in the same order,
    as the Python walk, on a model's tree and on a nested one."""
    from mlx_fused_sgd import optimizer as opt_module

    ext = opt_module._ext
    model = _model()
    k = mx.random.split(mx.random.key(7), 4)
    nested = {
        "b": [mx.ones((2,)), (mx.zeros((3,)), {"z": mx.ones((1,))})],
        "a": mx.random.normal((2, 2), key=k[0]),
    }
    for params, grads in (
        (model, _model_grads(model)),
        (
            nested,
            {
                "b": [mx.ones((2,)), (mx.ones((3,)), {"z": mx.ones((1,))})],
                "a": mx.ones((2, 2)),
            },
        ),
    ):
        opt = mfs.FusedSGD(0.1, momentum=momentum)
        opt.init(grads)
        key = "v" if momentum > 0 else None
        fast = ext.collect_tree(grads, params, opt.state, key)
        assert fast is not None
        slow = opt._collect_checked(grads, params, momentum > 0)
        assert len(fast[0]) == len(tree_flatten(grads)) > 0
        for got, want in zip(fast, slow):
            assert len(got) == len(want)
            assert all(x is y for x, y in zip(got, want))
        leaves = [x + 1 for x in fast[1]]
        rebuilt = ext.rebuild_tree(grads, leaves)
        want = opt_module._rebuild(grads, iter(leaves))
        assert _shape_of(rebuilt) == _shape_of(want)
        flat, flat_want = tree_flatten(rebuilt), tree_flatten(want)
        assert [k for k, _ in flat] == [k for k, _ in flat_want]
        assert all(x is y for (_, x), (_, y) in zip(flat, flat_want))


def _shape_of(tree):
    """The containers of a tree, leaves left out."""
    if isinstance(tree, dict):
        return (type(tree), [(k, _shape_of(v)) for k, v in tree.items()])
    if isinstance(tree, (list, tuple)):
        return (type(tree), [_shape_of(v) for v in tree])
    return None


def test_cxx_walk_leaves_the_unusual_to_python():
    """None (the Python walk runs) for a mismatch, a missing state entry or
    momentum buffer, a namedtuple, a non-array leaf, and too few leaves to
    rebuild a tree."""
    from mlx_fused_sgd import optimizer as opt_module

    ext = opt_module._ext
    a = mx.ones((2,))
    state = {"w": {"v": a}}
    assert ext.collect_tree({"w": a}, {"w": a}, state, "v") is not None
    assert ext.collect_tree({"w": a}, {"x": a}, state, "v") is None
    assert ext.collect_tree({"w": a}, {"w": [a]}, state, "v") is None
    assert ext.collect_tree({"w": a}, {"w": a}, {}, "v") is None
    assert ext.collect_tree({"w": a}, {"w": a}, {"w": {}}, "v") is None
    assert ext.collect_tree([a, a], [a], None) is None
    assert ext.collect_tree({"w": 1.0}, {"w": a}, None) is None
    assert ext.collect_tree(Pair(a, a), Pair(a, a), None) is None
    ordered = collections.OrderedDict(w=a)  # a dict subclass of gradients
    assert ext.collect_tree(ordered, {"w": a}, None) is None
    assert ext.rebuild_tree(ordered, [a]) is None
    assert ext.rebuild_tree(Pair(a, a), [a, a]) is None
    assert ext.rebuild_tree({"w": a, "b": a}, [a]) is None
    assert ext.rebuild_tree({"w": a}, [a, a]) is None
    deep_g, deep_p = a, a
    for _ in range(300):  # past the C++ walk's depth limit
        deep_g, deep_p = [deep_g], [deep_p]
    assert ext.collect_tree(deep_g, deep_p, None) is None
    assert ext.rebuild_tree(deep_g, [a]) is None
    assert opt_module._rebuild(deep_g, iter([a])) is not None

    class Interrupting(dict):
        def __getitem__(self, key):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # raised, not taken for a miss
        ext.collect_tree({"w": a}, Interrupting(w=a), None)
    states = [{"v": a}, {"v": a}]
    b = mx.zeros((2,))
    ext.set_state_items(states, "v", [b, None])
    assert states[0]["v"] is b and states[1]["v"] is a
