"""FusedSGD inside mx.compile: same numbers as eager, no retrace as the
learning rate decays."""

from functools import partial

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

import mlx_fused_sgd as mfs

from conftest import assert_bitwise_equal


def _setup(lr, dtype=mx.float32, **options):
    mx.random.seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))
    model.set_dtype(dtype)
    opt = mfs.FusedSGD(lr, momentum=0.9, weight_decay=1e-3, nesterov=True, **options)
    opt.init(model.trainable_parameters())
    mx.eval(model.parameters(), opt.state)
    x = mx.random.normal((32, 4))
    y = mx.random.normal((32, 2))
    loss_and_grad = nn.value_and_grad(model, lambda m: ((m(x) - y) ** 2).mean())
    return model, opt, loss_and_grad


# Options that change the state (master copies) or read the step counter
# inside the kernel (stochastic rounding), on bfloat16 params.
HALF_OPTIONS = {
    "master_weights": dict(master_weights=True, state_dtype=mx.float32),
    "stochastic_rounding": dict(stochastic_rounding=True, rounding_seed=3),
}


@pytest.mark.parametrize(
    "make_lr",
    [lambda: mfs.step_decay(0.1, 0.5, 3), lambda: 0.05],
    ids=["step_decay", "float"],
)
@pytest.mark.parametrize("options", [None, *HALF_OPTIONS], ids=str)
def test_compiled_step_matches_eager_without_retracing(make_lr, options):
    steps = 12  # crosses four decay boundaries
    setup = _setup
    if options is not None:
        setup = partial(_setup, dtype=mx.bfloat16, **HALF_OPTIONS[options])
    model_e, opt_e, lg_e = setup(make_lr())
    for _ in range(steps):
        _, grads = lg_e(model_e)
        opt_e.update(model_e, grads)
        mx.eval(model_e.parameters(), opt_e.state)

    model_c, opt_c, lg_c = setup(make_lr())
    traces = 0
    state = [model_c.state, opt_c.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def train_step():
        nonlocal traces
        traces += 1
        loss, grads = lg_c(model_c)
        opt_c.update(model_c, grads)
        return loss

    for _ in range(steps):
        train_step()
        mx.eval(state)

    assert traces == 1
    for (k, a), (_, b) in zip(
        tree_flatten(model_c.parameters()), tree_flatten(model_e.parameters())
    ):
        assert_bitwise_equal(a, b, k)
    for (k, a), (_, b) in zip(tree_flatten(opt_c.state), tree_flatten(opt_e.state)):
        assert_bitwise_equal(a, b, k)
    assert opt_c.state["step"].item() == steps
