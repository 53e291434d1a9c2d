"""State saved from stock SGD loads into FusedSGD and continues identically,
and the other way round."""

import mlx.core as mx
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten, tree_unflatten

import mlx_fused_sgd as mfs

from conftest import assert_bitwise_equal
from test_parity import MLP, train_steps


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

    got_params = dict(tree_flatten(model2.parameters()))
    got_state = dict(tree_flatten(opt2.state))
    assert got_params.keys() == expected_params.keys()
    for k in expected_params:
        assert_bitwise_equal(got_params[k], expected_params[k], k)
    assert got_state.keys() == expected_state.keys()
    for k in expected_state:
        assert_bitwise_equal(got_state[k], expected_state[k], k)
