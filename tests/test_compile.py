"""FusedSGD inside mx.compile: same numbers as eager, no retrace as the
learning rate decays."""

from functools import partial

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

import mlx_fused_sgd as mfs

from helpers import assert_bitwise_equal


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


# Every option under MLX's compile idiom, with what changes between steps
# (the loss scale, set from Python) and what a step reports (the norm, the
# skip flag) flowing through optimizer.state.
EVERY_OPTION = {
    "maximize": (mx.float32, dict(maximize=True)),
    "grad_scale_float": (mx.float32, dict(grad_scale=64.0)),
    "grad_scale_array": (mx.float32, dict(grad_scale=mx.array(64.0))),
    "skip_nonfinite": (mx.float32, dict(grad_scale=64.0, skip_nonfinite=True)),
    "max_grad_norm": (mx.float32, dict(max_grad_norm=0.05)),
    "state_dtype": (mx.bfloat16, dict(state_dtype=mx.float32)),
    "master_weights": (mx.bfloat16, HALF_OPTIONS["master_weights"]),
    "stochastic_rounding": (mx.bfloat16, HALF_OPTIONS["stochastic_rounding"]),
    "all_at_once": (
        mx.bfloat16,
        dict(
            maximize=True,
            grad_scale=64.0,
            skip_nonfinite=True,
            max_grad_norm=0.05,
            master_weights=True,
            state_dtype=mx.float32,
        ),
    ),
}


@pytest.mark.parametrize("name", list(EVERY_OPTION))
def test_every_option_compiled_gives_eager_bits_and_reports(name):
    dtype, options = EVERY_OPTION[name]
    steps = 8
    # A loss scale changed mid-run (a dynamic scaler), and a step whose
    # gradients overflow (skipped when skip_nonfinite is on).
    scales = {3: 32.0, 5: mx.array(16.0)}
    overflow_step = 4 if options.get("skip_nonfinite") else None

    def run(compiled):
        model, opt, loss_and_grad = _setup(
            mfs.step_decay(0.1, 0.5, 3), dtype=dtype, **options
        )
        state = [model.state, opt.state]

        def train_step(poison):
            _, grads = loss_and_grad(model)
            grads = {**grads}
            grads["layers"] = [
                {k: g * poison for k, g in layer.items()} for layer in grads["layers"]
            ]
            opt.update(model, grads)

        step = partial(mx.compile, inputs=state, outputs=state)(train_step)
        if not compiled:
            step = train_step
        reports = []
        for i in range(steps):
            if i in scales and opt.grad_scale is not None:
                opt.grad_scale = scales[i]
            poison = mx.array(mx.inf if i == overflow_step else 1.0, dtype)
            step(poison)
            mx.eval(state)
            norm = opt.last_grad_norm
            reports.append(
                (
                    opt.last_step_skipped.item(),
                    None if norm is None else norm.item(),
                    opt.state["step"].item(),
                )
            )
        return model, opt, reports

    model_e, opt_e, reports_e = run(compiled=False)
    model_c, opt_c, reports_c = run(compiled=True)
    assert reports_c == reports_e
    if overflow_step is not None:
        assert reports_e[overflow_step][0] is True
        assert reports_e[-1][2] == steps - 1  # the skipped step did not count
    if options.get("max_grad_norm"):
        assert all(r[1] is not None and r[1] > 0 for r in reports_e)
    for (k, a), (_, b) in zip(
        tree_flatten(model_c.parameters()), tree_flatten(model_e.parameters())
    ):
        assert_bitwise_equal(a, b, k)
    sc, se = dict(tree_flatten(opt_c.state)), dict(tree_flatten(opt_e.state))
    assert sc.keys() == se.keys()
    for k in se:
        assert_bitwise_equal(sc[k], se[k], k)


def test_a_changed_loss_scale_reaches_the_compiled_step():
    """The scale set between compiled steps is the one the step divides by:
    halving it doubles the update of a plain SGD step."""
    params = {"w": mx.zeros((3,))}
    opt = mfs.FusedSGD(1.0, grad_scale=4.0)
    opt.init(params)
    state = [opt.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(p):
        return opt.apply_gradients({"w": mx.ones((3,))}, p)

    first = step(params)["w"]
    opt.grad_scale = 2.0
    second = step(params)["w"]
    assert first.tolist() == [-0.25] * 3
    assert second.tolist() == [-0.5] * 3
