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

from conftest import assert_bitwise_equal

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
