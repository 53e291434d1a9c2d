"""State saved from stock SGD loads into FusedSGD and continues identically,
and the other way round."""

import mlx.core as mx
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten, tree_unflatten

import mlx_fused_sgd as mfs

from helpers import MLP, assert_bitwise_equal, train_steps


def _run(model, optimizer, steps, seed):
    train_steps(model, optimizer, steps, mx.random.key(seed))


def _save(path, model, optimizer):
    mx.save_safetensors(
        str(path / "params.safetensors"), dict(tree_flatten(model.parameters()))
    )
    mx.save_safetensors(
        str(path / "opt.safetensors"), dict(tree_flatten(optimizer.state))
    )


def _load(path, model, optimizer):
    model.update(
        tree_unflatten(list(mx.load(str(path / "params.safetensors")).items()))
    )
    optimizer.state = tree_unflatten(
        list(mx.load(str(path / "opt.safetensors")).items())
    )


def _assert_same_flat(tree, expected: dict) -> None:
    """`tree` flattened has exactly `expected`'s keys and bits."""
    got = dict(tree_flatten(tree))
    assert got.keys() == expected.keys()
    for k in expected:
        assert_bitwise_equal(got[k], expected[k], k)


def _make(cls, schedule):
    lr = (
        (mfs.step_decay if cls is mfs.FusedSGD else optim.step_decay)(0.1, 0.9, 7)
        if schedule
        else 0.05
    )
    return cls(lr, momentum=0.9, weight_decay=1e-3)


@pytest.mark.parametrize("schedule", [False, True], ids=["float_lr", "step_decay"])
@pytest.mark.parametrize(
    "first,second",
    [(optim.SGD, mfs.FusedSGD), (mfs.FusedSGD, optim.SGD)],
    ids=["stock_to_fused", "fused_to_stock"],
)
def test_resume_across_implementations(tmp_path, first, second, schedule):
    mx.random.seed(0)
    model = MLP()
    mx.eval(model.parameters())
    init_params = tree_flatten(model.parameters())

    # Uninterrupted run with the first implementation.
    opt = _make(first, schedule)
    _run(model, opt, 10, seed=1)
    _save(tmp_path, model, opt)
    _run(model, opt, 10, seed=2)
    expected_params = dict(tree_flatten(model.parameters()))
    expected_state = dict(tree_flatten(opt.state))

    # Resume from the checkpoint with the second implementation.
    mx.random.seed(0)
    model2 = MLP()
    model2.update(tree_unflatten(init_params))
    opt2 = _make(second, schedule)
    _load(tmp_path, model2, opt2)
    assert opt2.state["step"].item() == 10
    _run(model2, opt2, 10, seed=2)

    _assert_same_flat(model2.parameters(), expected_params)
    _assert_same_flat(opt2.state, expected_state)


class _Grads:
    """A deterministic gradient transform: scales by `scale` and, at the
    call numbers in `nan_at`, puts a NaN in one gradient."""

    def __init__(self, scale=1.0, nan_at=(), start=0):
        self.scale, self.nan_at, self.calls = scale, set(nan_at), start

    def __call__(self, grads):
        flat = tree_flatten(grads)
        flat = [(k, g * self.scale if self.scale != 1.0 else g) for k, g in flat]
        if self.calls in self.nan_at:
            k, g = flat[0]
            flat[0] = (k, mx.where(mx.arange(g.size).reshape(g.shape) == 0, mx.nan, g))
        self.calls += 1
        return tree_unflatten(flat)


# Every option of FusedSGD: (optimizer kwargs, param dtype, gradient scale,
# steps at which a gradient holds a NaN). The grad_scale cases once caught
# donated outputs inheriting the donor gradient's strides on size-1 axes: the
# params were equal, but the next forward pass took another matmul path and
# the resumed run drifted by an ulp.
OPTIONS = {
    "maximize": (dict(maximize=True), mx.float32, 1.0, ()),
    "grad_scale": (dict(grad_scale=1024.0), mx.float32, 1024.0, ()),
    "grad_scale_array": (dict(grad_scale=mx.array(256.0)), mx.float32, 256.0, ()),
    "skip_nonfinite": (
        dict(grad_scale=64.0, skip_nonfinite=True),
        mx.float32,
        64.0,
        (3, 7),
    ),
    "max_grad_norm": (dict(max_grad_norm=0.05), mx.float32, 1.0, ()),
    "state_dtype": (dict(state_dtype=mx.float32), mx.bfloat16, 1.0, ()),
    "master_weights": (dict(master_weights=True), mx.float16, 1.0, ()),
    "master_weights_f32_state": (
        dict(master_weights=True, state_dtype=mx.float32),
        mx.bfloat16,
        1.0,
        (),
    ),
    "stochastic_rounding": (
        dict(stochastic_rounding=True, rounding_seed=5),
        mx.bfloat16,
        1.0,
        (),
    ),
    "everything": (
        dict(
            maximize=True,
            grad_scale=128.0,
            skip_nonfinite=True,
            max_grad_norm=0.5,
            stochastic_rounding=True,
            rounding_seed=2**63 + 1,
        ),
        mx.bfloat16,
        128.0,
        (2, 8),
    ),
}


@pytest.mark.parametrize("schedule", [False, True], ids=["float_lr", "step_decay"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_every_option_survives_checkpoint_and_resume(tmp_path, option, schedule):
    """Train 5 steps, save params and state, train 5 more; a fresh optimizer
    with the same options, loaded from the checkpoint, must reach the same
    bits (params and every state entry, master copies included)."""
    kwargs, dtype, scale, nan_at = OPTIONS[option]

    def make():
        lr = mfs.step_decay(0.02, 0.9, 3) if schedule else 0.01
        return mfs.FusedSGD(lr, momentum=0.9, weight_decay=1e-3, **kwargs)

    mx.random.seed(0)
    model = MLP()
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    init_params = tree_flatten(model.parameters())
    opt = make()
    train_steps(model, opt, 5, mx.random.key(1), _Grads(scale, nan_at))
    _save(tmp_path, model, opt)
    train_steps(model, opt, 5, mx.random.key(2), _Grads(scale, nan_at, start=5))
    expected_params = dict(tree_flatten(model.parameters()))
    expected_state = dict(tree_flatten(opt.state))
    if "master_weights" in kwargs:
        assert any(k.endswith(".master") for k in expected_state)

    model2 = MLP()
    model2.set_dtype(dtype)
    model2.update(tree_unflatten(init_params))
    opt2 = make()
    _load(tmp_path, model2, opt2)
    train_steps(model2, opt2, 5, mx.random.key(2), _Grads(scale, nan_at, start=5))
    _assert_same_flat(model2.parameters(), expected_params)
    _assert_same_flat(opt2.state, expected_state)
    if nan_at:
        # The NaN steps were skipped: the counter counts only the others.
        assert opt2.state["step"].item() == 10 - len(nan_at)


def _broadcast_grads(step):
    """A gradient tree whose "w" gradient broadcasts to its param (as a
    custom gradient or a tied, broadcast parameter gives)."""
    mx.random.seed(100 + step)
    return {"w": mx.random.normal((1, 4)), "b": mx.random.normal((4,))}


@pytest.mark.parametrize(
    "options",
    [
        dict(momentum=0.9),
        dict(momentum=0.9, nesterov=True),
        dict(momentum=0.8, dampening=0.1),
    ],
    ids=["momentum", "nesterov", "dampening"],
)
def test_stock_checkpoint_of_broadcast_gradients_resumes(tmp_path, options):
    """Stock builds its momentum buffers from the gradient tree, so a
    broadcast gradient's buffer has the gradient's shape (without weight
    decay) and stock's checkpoint holds it so. FusedSGD resumes it with
    stock's results; its own buffer has the param's shape (the broadcast of
    stock's values)."""
    params = {
        "w": mx.arange(12, dtype=mx.float32).reshape(3, 4) / 7,
        "b": mx.ones((4,)),
    }
    stock = optim.SGD(0.05, **options)
    p_stock = params
    for step in range(3):
        p_stock = stock.apply_gradients(_broadcast_grads(step), p_stock)
    mx.eval(p_stock, stock.state)
    assert stock.state["w"]["v"].shape == (1, 4)  # the layout being resumed
    mx.save_safetensors(
        str(tmp_path / "opt.safetensors"), dict(tree_flatten(stock.state))
    )

    ours = mfs.FusedSGD(0.05, **options)
    ours.state = tree_unflatten(
        list(mx.load(str(tmp_path / "opt.safetensors")).items())
    )
    p_ours = p_stock
    for step in range(3, 7):
        p_stock = stock.apply_gradients(_broadcast_grads(step), p_stock)
        p_ours = ours.apply_gradients(_broadcast_grads(step), p_ours)
        mx.eval(p_stock, p_ours, stock.state, ours.state)
        for k in ("w", "b"):
            assert_bitwise_equal(p_ours[k], p_stock[k], k)
    assert ours.state["w"]["v"].shape == (3, 4)
    assert_bitwise_equal(
        ours.state["w"]["v"], mx.broadcast_to(stock.state["w"]["v"], (3, 4)), "v"
    )
    assert ours.state["step"].item() == stock.state["step"].item() == 7


def test_a_momentum_buffer_that_does_not_broadcast_is_refused():
    ours = mfs.FusedSGD(0.05, momentum=0.9)
    ours.state = {
        "step": mx.array(1, mx.uint64),
        "learning_rate": mx.array(0.05),
        "w": {"v": mx.zeros((2, 4))},
    }
    with pytest.raises(ValueError, match=r"momentum buffer 'w' has shape \(2, 4\)"):
        ours.apply_gradients({"w": mx.ones((3, 4))}, {"w": mx.ones((3, 4))})
