"""float64 params on the CPU: stock's bits (the math in double, with the
Python hyperparameters unrounded, as stock's ops compute it); on a device
without float64, a clear error naming the param."""

import warnings
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten

import mlx_fused_sgd as mfs

from helpers import assert_bitwise_equal

# The warning that names float64 params (they take stock's ops, not the
# fused kernel) is the subject of its own test below.
pytestmark = pytest.mark.filterwarnings("ignore:FusedSGD.*float64:UserWarning")

OPTIONS = [
    {},
    {"momentum": 0.9, "weight_decay": 1e-4},
    {"momentum": 0.8, "dampening": 0.3},
    {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
]


def _params():
    k = mx.random.split(mx.random.key(0), 3)
    return {
        "w": mx.random.normal((4, 3), key=k[0]).astype(mx.float64),
        "b": mx.random.normal((3,), key=k[1]).astype(mx.float64),
        "f32": mx.random.normal((5,), key=k[2]),  # a float32 param beside them
    }


def _grads(i):
    return {
        k: mx.random.normal(v.shape, key=mx.random.key(10 + i)).astype(v.dtype)
        for k, v in _params().items()
    }


@pytest.mark.devices("cpu")
@pytest.mark.parametrize("schedule", [False, True], ids=["float_lr", "step_decay"])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_float64_params_give_stock_bits(options, schedule):
    ours = mfs.FusedSGD(mfs.step_decay(0.1, 0.5, 2) if schedule else 0.1, **options)
    stock = optim.SGD(optim.step_decay(0.1, 0.5, 2) if schedule else 0.1, **options)
    a = b = _params()
    for i in range(4):
        a = ours.apply_gradients(_grads(i), a)
        b = stock.apply_gradients(_grads(i), b)
        mx.eval(a, b, ours.state, stock.state)
    for k in b:
        assert a[k].dtype == b[k].dtype
        assert_bitwise_equal(a[k], b[k], k)
    if options.get("momentum"):
        for (k, x), (_, y) in zip(tree_flatten(ours.state), tree_flatten(stock.state)):
            assert_bitwise_equal(x, y, k)


@pytest.mark.devices("cpu")
def test_float64_hyperparameters_are_not_rounded_to_float32():
    """The weight decay meets a float64 param unrounded, as in stock: with
    float32(1e-4) instead, the result differs (so the test above can fail)."""
    p, g = _params()["w"], _grads(0)["w"]
    ours = mfs.FusedSGD(0.1, weight_decay=1e-4).apply_gradients({"w": g}, {"w": p})
    lr = mx.array(0.1).astype(mx.float64)
    rounded = p - lr * (g + mx.array(1e-4, mx.float32).astype(mx.float64) * p)
    exact = p - lr * (g + 1e-4 * p)
    assert_bitwise_equal(ours["w"], exact, "exact")
    assert not mx.array_equal(ours["w"], rounded).item()


@pytest.mark.devices("cpu")
def test_float64_model_compiled_gives_stock_bits():
    """An mlx.nn model in float64 under MLX's compile idiom."""

    def train(opt):
        mx.random.seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
        model.set_dtype(mx.float64)
        loss_and_grad = nn.value_and_grad(model, lambda m, x: (m(x) ** 2).mean())
        state = [model.state, opt.state]

        @partial(mx.compile, inputs=state, outputs=state)
        def step(x):
            loss, grads = loss_and_grad(model, x)
            opt.update(model, grads)
            return loss

        x = mx.random.normal((4, 6), key=mx.random.key(1)).astype(mx.float64)
        losses = [step(x) for _ in range(3)]
        mx.eval(losses, model.parameters())
        return losses, model

    got, ours = train(mfs.FusedSGD(mfs.step_decay(0.1, 0.5, 2), momentum=0.9))
    want, stock = train(optim.SGD(optim.step_decay(0.1, 0.5, 2), momentum=0.9))
    for a, b in zip(got, want):
        assert_bitwise_equal(a, b, "loss")
    for (k, a), (_, b) in zip(
        tree_flatten(ours.parameters()), tree_flatten(stock.parameters())
    ):
        assert a.dtype == mx.float64
        assert_bitwise_equal(a, b, k)


@pytest.mark.devices("gpu")
def test_float64_on_a_device_without_it_is_refused_by_name():
    """MLX computes float64 on the CPU only: on the GPU the step is refused
    with the param's path, and nothing changes."""
    opt = mfs.FusedSGD(0.1, momentum=0.9)
    params = {"w": mx.ones((3,), mx.float64, stream=mx.cpu)}
    with pytest.raises(ValueError, match="param 'w' has dtype float64.*CPU only"):
        opt.apply_gradients({"w": mx.ones((3,), mx.float64, stream=mx.cpu)}, params)
    assert opt.state["step"].item() == 0


@pytest.mark.devices("cpu")
def test_float64_with_the_gradient_check_options_is_refused_by_name():
    """skip_nonfinite and max_grad_norm read every gradient in float32
    kernels: a float64 gradient is refused there, by its path."""
    p = {"w": mx.ones((3,), mx.float64)}
    for option in ({"skip_nonfinite": True}, {"max_grad_norm": 1.0}):
        opt = mfs.FusedSGD(0.1, **option)
        with pytest.raises(ValueError, match="gradient 'w' has dtype float64"):
            opt.apply_gradients({"w": mx.ones((3,), mx.float64)}, p)
        assert opt.state["step"].item() == 0


@pytest.mark.devices("cpu")
@pytest.mark.filterwarnings("default")
def test_float64_params_are_named_as_not_fused():
    """Once, at the first step: which params take stock's ops in double."""
    opt = mfs.FusedSGD(0.1, momentum=0.9)
    with pytest.warns(UserWarning, match=r"params 'w', 'b' are float64.*not the fused"):
        params = opt.apply_gradients(_grads(0), _params())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not again
        opt.apply_gradients(_grads(1), params)
