"""Bad input: a clear exception naming what is wrong, raised before anything
is evaluated or written; params and optimizer state are left exactly as they
were (step counter included)."""

import subprocess
import sys

import mlx.core as mx
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten

import mlx_fused_sgd as mfs

from helpers import assert_bitwise_equal, sgd_fallback


def _params():
    return {
        "w": mx.arange(12, dtype=mx.float32).reshape(3, 4),
        "layers": [{"b": mx.ones((4,))}, {"b": mx.full((2,), 3.0)}],
    }


def _grads():
    return {
        "w": mx.full((3, 4), 0.5),
        "layers": [{"b": mx.ones((4,))}, {"b": mx.ones((2,))}],
    }


def _snapshot(opt, params):
    return (
        [(k, v) for k, v in tree_flatten(opt.state)],
        [(k, v) for k, v in tree_flatten(params)],
        sorted(k for k, _ in tree_flatten(opt.state)),
    )


def _assert_unchanged(before, opt, params):
    state, prm, keys = before
    assert sorted(k for k, _ in tree_flatten(opt.state)) == keys
    now = dict(tree_flatten(opt.state))
    for k, v in state:
        assert_bitwise_equal(now[k], v, k)
    nowp = dict(tree_flatten(params))
    for k, v in prm:
        assert_bitwise_equal(nowp[k], v, k)


def _bad_grads():
    g = _grads()
    yield (
        "shape",
        lambda: {**g, "w": mx.ones((4, 3))},
        ValueError,
        r"gradient 'w' has shape \(4, 3\) but param 'w' has shape \(3, 4\)",
    )
    yield (
        "dtype",
        lambda: {**g, "w": mx.ones((3, 4), mx.int32)},
        ValueError,
        "gradient 'w' has dtype int32 but param 'w' has dtype float32",
    )
    yield (
        "missing param",
        lambda: {**g, "extra": mx.ones((2,))},
        ValueError,
        "gradient 'extra' has no parameter",
    )
    yield (
        "list length",
        lambda: {**g, "layers": [{"b": mx.ones((4,))}] * 3},
        ValueError,
        "does not match the parameters at 'layers'",
    )
    yield (
        "not an array",
        lambda: {**g, "w": 1.0},
        TypeError,
        "gradient 'w' must be an mx.array",
    )
    yield (
        "leaf vs tree",
        lambda: {**g, "w": {"x": mx.ones((3, 4))}},
        ValueError,
        "does not match the parameters at 'w'",
    )


@pytest.mark.parametrize("first_step", [True, False], ids=["first_step", "later_step"])
@pytest.mark.parametrize("case", list(_bad_grads()), ids=lambda c: c[0])
@pytest.mark.parametrize("lr", ["float", "step_decay"])
def test_refused_step_changes_nothing(case, first_step, lr):
    _, make_bad, exc, match = case
    learning_rate = 0.1 if lr == "float" else mfs.step_decay(0.1, 0.5, 2)
    opt = mfs.FusedSGD(learning_rate, momentum=0.9, weight_decay=1e-3)
    params = _params()
    if not first_step:
        for _ in range(3):
            params = opt.apply_gradients(_grads(), params)
        mx.eval(params, opt.state)
    before = _snapshot(opt, params)
    with pytest.raises(exc, match=match):
        opt.apply_gradients(make_bad(), params)
    _assert_unchanged(before, opt, params)
    # And the optimizer still works, continuing from where it was.
    assert opt.state["step"].item() == (0 if first_step else 3)
    opt.apply_gradients(_grads(), params)


def test_stock_advances_the_step_on_a_bad_tree_but_we_do_not():
    bad = {**_grads(), "w": mx.ones((4, 3))}
    stock, ours = optim.SGD(0.1, momentum=0.9), mfs.FusedSGD(0.1, momentum=0.9)
    for opt in (stock, ours):
        with pytest.raises(ValueError):
            opt.apply_gradients(bad, _params())
            mx.eval(opt.state)
    assert ours.state["step"].item() == 0


def test_mismatched_state_is_refused_cleanly():
    opt = mfs.FusedSGD(0.1, momentum=0.9)
    params = _params()
    opt.init(params)
    opt.state["w"]["v"] = mx.zeros((2, 2))  # e.g. a checkpoint of another model
    mx.eval(opt.state)
    before = _snapshot(opt, params)
    with pytest.raises(
        ValueError,
        match=r"momentum buffer 'w' has shape \(2, 2\) but param 'w' has shape \(3, 4\)",
    ):
        opt.apply_gradients(_grads(), params)
    _assert_unchanged(before, opt, params)


@pytest.mark.parametrize("dtype", [mx.int32, mx.uint8, mx.bool_, mx.complex64], ids=str)
def test_non_float_params_are_refused(dtype):
    p = mx.ones((3,), dtype)
    with pytest.raises(
        ValueError, match=f"param has dtype {str(dtype).split('.')[-1]}"
    ):
        mfs.sgd_update(p, p, learning_rate=0.1)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(momentum=-0.1), "momentum must be a finite number >= 0"),
        (dict(momentum=float("inf")), "momentum must be a finite number >= 0"),
        (dict(momentum=0.5, dampening=-0.1), r"dampening must be in \[0, 1\]"),
        (dict(momentum=0.5, dampening=1.5), r"dampening must be in \[0, 1\]"),
        (dict(weight_decay=float("nan")), "weight_decay must be a finite number"),
        (dict(nesterov=True), "Nesterov momentum requires"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mfs.FusedSGD(0.1, **kwargs)
    with pytest.raises(ValueError, match=match):
        mfs.sgd_update(mx.ones(3), mx.ones(3), learning_rate=0.1, **kwargs)


@pytest.mark.parametrize(
    "args,exc,match",
    [
        ((0.1, 0.9, 0), ValueError, "step_size must be greater than 0"),
        ((0.1, 0.9, 2.0), TypeError, "step_size must be an int"),
        ((float("inf"), 0.9, 2), ValueError, "init must be a finite number"),
        ((0.1, float("nan"), 2), ValueError, "decay_rate must be a finite number"),
    ],
)
def test_bad_schedules_are_refused(args, exc, match):
    with pytest.raises(exc, match=match):
        mfs.step_decay(*args)


def test_float_step_array_is_refused():
    with pytest.raises(ValueError, match="integer array"):
        mfs.step_decay(0.1, 0.9, 2)(mx.array([1.5]))


def test_lists_of_unequal_length_are_refused():
    with pytest.raises(ValueError, match="same length"):
        mfs.sgd_update_many([mx.ones(2)] * 2, [mx.ones(2)], learning_rate=0.1)
    with pytest.raises(
        ValueError, match="velocities must be empty or have one entry per param"
    ):
        mfs.sgd_update_many(
            [mx.ones(2)] * 2,
            [mx.ones(2)] * 2,
            [mx.ones(2)],
            learning_rate=0.1,
            momentum=0.9,
        )


def test_broadcast_rules_match_stock():
    """A gradient may broadcast to its param (stock's `param - lr * grad`
    broadcasts); a param may not grow to the gradient's shape."""
    p = mx.ones((3, 4))
    new_p, _ = mfs.sgd_update(p, mx.ones((4,)), learning_rate=0.1)
    assert new_p.shape == (3, 4)
    with pytest.raises(
        ValueError, match="must have the parameter's shape or broadcast to it"
    ):
        mfs.sgd_update(mx.ones((4,)), mx.ones((3, 4)), learning_rate=0.1)


# ---------------------------------------------------------------------------
# Scalars checked as the float32 / uint64 the kernels use; flags of any width
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(learning_rate=1e39), "learning_rate"),
        (dict(learning_rate=0.1, grad_scale=1e39), "grad_scale"),
        (dict(learning_rate=0.1, grad_scale=1e-320), "grad_scale"),
        (dict(learning_rate=0.1, weight_decay=1e39), "weight_decay"),
        (dict(learning_rate=0.1, momentum=1e39), "momentum"),
    ],
    ids=lambda x: (
        x if isinstance(x, str) else "-".join(f"{k}={v}" for k, v in x.items())
    ),
)
def test_scalars_checked_as_float32(kwargs, name):
    """Python numbers that overflow float32, or a loss scale that rounds to
    0 in it, are refused naming the argument (they used to give inf params
    or a silently vanishing update)."""
    p, g = mx.ones((3,)), mx.ones((3,))
    with pytest.raises(ValueError, match=name):
        mfs.sgd_update(p, g, None, **kwargs)


def test_optimizer_scalars_checked_as_float32():
    with pytest.raises(ValueError, match="learning_rate"):
        mfs.FusedSGD(1e39)
    with pytest.raises(ValueError, match="grad_scale"):
        mfs.FusedSGD(0.1, grad_scale=1e-320)
    with pytest.raises(ValueError, match="weight_decay"):
        mfs.FusedSGD(0.1, weight_decay=-1e39)


def test_huge_integer_learning_rate_and_rounding_step():
    """Python ints past int64 used to raise std::bad_cast."""
    p, g = mx.ones((3,)), mx.ones((3,))
    new_p, _ = mfs.sgd_update(p, g, None, learning_rate=2**63)
    assert new_p.tolist() == [1 - 2.0**63] * 3
    assert mfs.FusedSGD(2**63).state["learning_rate"].item() == 2.0**63
    half = [p.astype(mx.bfloat16)], [g.astype(mx.bfloat16)]
    for step in (2**63, 2**64 - 1):
        got = mfs.sgd_update_many(
            *half, None, learning_rate=0.1, rounding_seed=7, rounding_step=step
        )
        want = mfs.sgd_update_many(
            *half,
            None,
            learning_rate=0.1,
            rounding_seed=7,
            rounding_step=mx.array(step - 2**63, mx.uint64)
            + mx.array(2**62, mx.uint64) * 2,
        )
        mx.eval(got, want)
        assert got[0][0].tolist() == want[0][0].tolist()
    with pytest.raises(TypeError, match="rounding_step"):
        mfs.sgd_update_many(
            *half, None, learning_rate=0.1, rounding_seed=7, rounding_step=2**64
        )


@pytest.mark.parametrize("dtype", [mx.int64, mx.uint64])
def test_skip_flag_of_any_width(dtype):
    """A nonzero 64-bit flag whose low 32 bits are zero skips (it was cast
    to uint32 and did not)."""
    p, g = mx.ones((3,)), mx.ones((3,))
    kw = dict(learning_rate=mx.array(0.1), skip=mx.array(2**32, dtype))
    new_p, _ = mfs.sgd_update(p, g, None, **kw)
    assert new_p.tolist() == [1.0, 1.0, 1.0], "kernel"
    fallback = sgd_fallback([p], [g], [], **kw)
    assert fallback[0][0].tolist() == [1.0, 1.0, 1.0], "composed fallback"


def test_tensors_per_primitive_is_bounded():
    p, g = [mx.ones((3,))] * 2, [mx.ones((3,))] * 2
    for bad in (0, 257, 4000):
        with pytest.raises(
            ValueError, match=r"tensors_per_primitive must be in \[1, 256\]"
        ):
            mfs.sgd_update_many(
                p, g, None, learning_rate=0.1, tensors_per_primitive=bad
            )
    mfs.sgd_update_many(p, g, None, learning_rate=0.1, tensors_per_primitive=256)


@pytest.mark.skipif(
    not sys.platform.startswith("linux"),
    reason="Linux refuses a 4 TB allocation; other systems may overcommit it",
)
def test_failed_allocation_raises_instead_of_crashing():
    """A param that is a broadcast view of huge logical size: the output
    allocation fails, and mx.eval raises a clear error (it used to segfault
    writing through the missing buffer); the process goes on working."""
    code = (
        "import mlx.core as mx, mlx_fused_sgd as mfs\n"
        "p = mx.broadcast_to(mx.array(1.0), (2**20, 2**20))\n"
        "out = mfs.sgd_update(p, p, None, learning_rate=0.1)\n"
        "try:\n"
        "    mx.eval(out)\n"
        "except RuntimeError as e:\n"
        "    print('raised:', e)\n"
        "print(mfs.sgd_update(mx.ones((2,)), mx.ones((2,)), None, learning_rate=0.5)[0].tolist())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "raised: mlx_fused_sgd: could not allocate" in proc.stdout
    assert "(1048576, 1048576)" in proc.stdout and "[0.5, 0.5]" in proc.stdout
