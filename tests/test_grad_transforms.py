"""maximize and grad_scale: folded into the update kernel (the gradient is
divided by the loss scale, and negated for maximize, before weight decay, as
PyTorch orders it), with stock's numbers on the transformed gradients."""

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

import mlx_fused_sgd as mfs

from helpers import MLP, assert_bitwise_equal, train_steps


def _train_pair(make_fused, make_stock, transform, steps=20):
    """Train two identical models: FusedSGD on the raw gradients, stock SGD
    on `transform(grads)`; return both (model, optimizer) pairs."""
    out = []
    for make, fn in ((make_fused, None), (make_stock, transform)):
        mx.random.seed(0)
        model = MLP()
        mx.eval(model.parameters())
        opt = make()
        train_steps(model, opt, steps, mx.random.key(7), fn)
        out.append((model, opt))
    return out


def _exactly(fn):
    """The stock side's gradient transform, done in NumPy (IEEE float32, one
    rounding) on evaluated gradients. Done lazily in MLX instead,
    `grad / mx.array(s)` inside this training graph gave run-to-run different
    bits in MLX 0.32.4 itself (stock SGD alone, no op of this package
    involved), which would make the comparison flaky."""
    return lambda grads: tree_map(lambda g: mx.array(fn(np.array(g))), grads)


def _assert_same(a, b, momentum):
    (ma, oa), (mb, ob) = a, b
    pa, pb = dict(tree_flatten(ma.parameters())), dict(tree_flatten(mb.parameters()))
    for k in pa:
        assert_bitwise_equal(pa[k], pb[k], k)
    sa, sb = dict(tree_flatten(oa.state)), dict(tree_flatten(ob.state))
    # FusedSGD keeps its loss scale in its state too (stock has none).
    sa.pop("grad_scale", None)
    if not momentum:
        # Stock keeps zero momentum buffers it never reads; FusedSGD none.
        sb = {k: v for k, v in sb.items() if not k.endswith(".v")}
    assert sa.keys() == sb.keys()
    for k in sa:
        assert_bitwise_equal(sa[k], sb[k], k)


HYPER = [
    dict(momentum=0.9, weight_decay=1e-3),
    dict(momentum=0.8, dampening=0.2),
    dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
    dict(weight_decay=1e-2),
]


@pytest.mark.parametrize("kw", HYPER, ids=str)
def test_maximize_is_stock_on_negated_gradients(kw):
    # Ascending the loss diverges: few, small steps keep every value finite
    # (so the comparison is of numbers, not of NaN payloads).
    a, b = _train_pair(
        lambda: mfs.FusedSGD(mfs.step_decay(0.01, 0.9, 2), maximize=True, **kw),
        lambda: optim.SGD(optim.step_decay(0.01, 0.9, 2), **kw),
        _exactly(lambda g: -g),
        steps=6,
    )
    for _, v in tree_flatten(a[0].parameters()):
        assert mx.all(mx.isfinite(v)).item()
    _assert_same(a, b, kw.get("momentum", 0) > 0)


@pytest.mark.parametrize("kw", HYPER, ids=str)
@pytest.mark.parametrize("as_array", [False, True], ids=["float", "array"])
def test_grad_scale_is_stock_on_divided_gradients(kw, as_array):
    scale = 1536.0
    grad_scale = mx.array(scale) if as_array else scale
    a, b = _train_pair(
        lambda: mfs.FusedSGD(0.05, grad_scale=grad_scale, **kw),
        lambda: optim.SGD(0.05, **kw),
        _exactly(lambda g: g / np.float32(scale)),
    )
    _assert_same(a, b, kw.get("momentum", 0) > 0)


def test_maximize_and_grad_scale_together():
    scale = 3.0
    a, b = _train_pair(
        lambda: mfs.FusedSGD(0.01, momentum=0.9, maximize=True, grad_scale=scale),
        lambda: optim.SGD(0.01, momentum=0.9),
        _exactly(lambda g: -(g / np.float32(scale))),
        steps=6,
    )
    _assert_same(a, b, True)


def test_grad_scale_can_change_between_steps():
    """A dynamic loss scale: an array set before each step, never retraced
    into a new kernel variant."""
    p, g = {"w": mx.ones((5,))}, {"w": mx.full((5,), 8.0)}
    opt = mfs.FusedSGD(0.5, grad_scale=mx.array(2.0))
    p = opt.apply_gradients(g, p)
    opt.grad_scale = mx.array(4.0)
    p = opt.apply_gradients(g, p)
    # 1 - 0.5 * 8/2 = -1; -1 - 0.5 * 8/4 = -2
    assert p["w"].tolist() == [-2.0] * 5


@pytest.mark.parametrize(
    "value,exc,match",
    [
        (0.0, ValueError, "grad_scale must be a finite nonzero number"),
        (float("inf"), ValueError, "grad_scale must be a finite nonzero number"),
        (float("nan"), ValueError, "grad_scale must be a finite nonzero number"),
        ("2", TypeError, "grad_scale must be a float"),
    ],
)
def test_bad_grad_scale_is_refused(value, exc, match):
    with pytest.raises(exc, match=match):
        mfs.FusedSGD(0.1, grad_scale=value)
    with pytest.raises(exc, match=match):
        mfs.sgd_update(mx.ones(3), mx.ones(3), learning_rate=0.1, grad_scale=value)


def test_non_scalar_grad_scale_array_is_refused_before_anything_changes():
    opt = mfs.FusedSGD(0.1, momentum=0.9, grad_scale=mx.ones((2,)))
    params = {"w": mx.ones((3,))}
    with pytest.raises(
        ValueError,
        match=r"grad_scale must be a scalar, but got an array of shape \(2,\)",
    ):
        opt.apply_gradients({"w": mx.ones((3,))}, params)
    assert opt.state["step"].item() == 0
