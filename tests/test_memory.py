"""Memory of a steady-state training loop: nothing grows, and the optimizer
updates in place what MLX lets it (see README, "In-place updates")."""

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten

import mlx_fused_sgd as mfs

# Bytes of scalar arrays (step counter, learning rate, the update's scalar
# inputs) that may be alive at the peak: which of them still are depends on
# when MLX's CPU tasks release them (16 bytes in plain runs here, 148 once
# under AddressSanitizer). Half the smallest tensor of the model (a 256-float
# bias, 1 KiB), so no tensor copy fits in it.
SCALARS = 512


def _loop_memory(opt, eval_grads_first: bool, steps: int = 100):
    """(active-memory growth over `steps` steps, step peak above the
    gradient-only peak, bytes of the params)."""
    mx.random.seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256))
    x = mx.random.normal((8, 256))
    loss_and_grad = nn.value_and_grad(model, lambda m: (m(x) ** 2).mean())
    opt.init(model.trainable_parameters())
    mx.eval(model.parameters(), opt.state)
    param_bytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))

    def step():
        loss, grads = loss_and_grad(model)
        if eval_grads_first:
            mx.eval(grads)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss)

    for _ in range(5):
        step()
    mx.synchronize()
    active = mx.get_active_memory()
    mx.reset_peak_memory()
    loss, grads = loss_and_grad(model)
    mx.eval(loss, grads)
    grad_peak = mx.get_peak_memory()
    del loss, grads
    mx.synchronize()
    mx.reset_peak_memory()
    for _ in range(steps):
        step()
    mx.synchronize()
    return (
        mx.get_active_memory() - active,
        mx.get_peak_memory() - grad_peak,
        param_bytes,
    )


def _fused():
    return mfs.FusedSGD(mfs.step_decay(0.1, 0.9, 10), momentum=0.9, weight_decay=1e-4)


def _stock():
    return optim.SGD(optim.step_decay(0.1, 0.9, 10), momentum=0.9, weight_decay=1e-4)


def test_fully_in_place_when_grads_are_evaluated_first():
    growth, extra_peak, param_bytes = _loop_memory(_fused(), eval_grads_first=True)
    assert growth <= 0
    # Params and momentum both updated in their own buffers.
    assert extra_peak <= SCALARS


def test_one_graph_loop_adds_at_most_one_param_copy():
    # In one lazy graph the forward pass's pending CPU tasks still hold the
    # param buffers when the update is encoded, so MLX does not let them be
    # donated; the momentum buffers still are.
    growth, extra_peak, param_bytes = _loop_memory(_fused(), eval_grads_first=False)
    assert growth <= 0
    assert extra_peak <= param_bytes + SCALARS


@pytest.mark.parametrize("eval_grads_first", [True, False])
def test_memory_checks_can_fail(eval_grads_first):
    """Stock SGD allocates new params and momentum every step: the bounds
    above must reject it, or they prove nothing."""
    _, extra_peak, param_bytes = _loop_memory(_stock(), eval_grads_first)
    assert extra_peak > param_bytes + SCALARS
