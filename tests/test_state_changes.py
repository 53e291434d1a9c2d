"""State that changed between steps, by the user or by stock: momentum
switched on, a half-precision momentum buffer met by float32 gradients or
weight decay, a momentum buffer that is not an mx.array. Each gives stock
optim.SGD's bits (float32, CPU) or a clear error naming the parameter, with
nothing changed; a random mix of fused steps, stock steps on the same state,
option changes, param resets and checkpoint round trips is checked against
stock after every step."""

import os
import warnings

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten, tree_unflatten

import mlx_fused_sgd as mfs

from helpers import assert_bitwise_equal, sgd_fallback

# Once, on the CPU: the bit-for-bit contract is float32 on the CPU.
pytestmark = pytest.mark.devices("cpu")


SHAPE = (3, 5)


def _params():
    return {"w": mx.random.normal(SHAPE, key=mx.random.key(0)), "b": mx.ones((5,))}


def _grads(i, dtype=mx.float32):
    k = mx.random.split(mx.random.key(100 + i))
    return {
        "w": mx.random.normal(SHAPE, key=k[0]).astype(dtype),
        "b": mx.random.normal((5,), key=k[1]).astype(dtype),
    }


def _assert_same(ours, stock, what=""):
    a, b = dict(tree_flatten(ours)), dict(tree_flatten(stock))
    for k in a.keys() & b.keys():
        assert_bitwise_equal(a[k], b[k], f"{what} {k}")


def _run(opt, schedule):
    """Steps with (grad dtype, weight decay, momentum) from ``schedule``."""
    params = _params()
    for i, (dtype, wd, momentum) in enumerate(schedule):
        opt.weight_decay, opt.momentum = wd, momentum
        params = opt.apply_gradients(_grads(i, dtype), params)
        mx.eval(params, opt.state)
    return params


@pytest.mark.parametrize(
    "schedule",
    [
        # momentum warm-up starting at 0 (FusedSGD keeps no buffers then)
        [(mx.float32, 0.0, 0.0)] * 2 + [(mx.float32, 0.0, 0.9)] * 2,
        [(mx.float32, 1e-3, 0.0), (mx.float32, 1e-3, 0.5), (mx.float32, 1e-3, 0.9)],
        # a bfloat16 buffer of a float32 param, then float32 gradients
        [(mx.bfloat16, 0.0, 0.9)] * 2 + [(mx.float32, 0.0, 0.9)] * 2,
        # ... then weight decay turned on
        [(mx.bfloat16, 0.0, 0.9)] * 2 + [(mx.bfloat16, 1e-3, 0.9)] * 2,
        [(mx.float16, 0.0, 0.9), (mx.float32, 1e-2, 0.9), (mx.float16, 0.0, 0.9)],
        # half gradients of one kind, then the other
        [(mx.bfloat16, 0.0, 0.9), (mx.float16, 0.0, 0.9)],
    ],
    ids=[
        "momentum-on",
        "momentum-ramp",
        "half-buffer-then-f32-grads",
        "half-buffer-then-weight-decay",
        "f16-buffer-mixed",
        "bf16-then-f16-grads",
    ],
)
@pytest.mark.parametrize("extra", [{}, {"nesterov": True}, {"dampening": 0.25}])
def test_changed_options_give_stock_bits(schedule, extra):
    if extra.get("nesterov") and schedule[0][2] == 0:
        pytest.skip("Nesterov needs momentum from the start")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # half gradients of float32 params
        ours = mfs.FusedSGD(0.1, momentum=schedule[0][2], **extra)
        stock = optim.SGD(0.1, momentum=schedule[0][2], **extra)
        got, want = _run(ours, schedule), _run(stock, schedule)
    _assert_same(got, want, "param")
    _assert_same(ours.state, stock.state, "state")
    assert ours.state["w"]["v"].dtype == stock.state["w"]["v"].dtype


def test_checkpoint_without_buffers_resumes_with_momentum(tmp_path):
    """A state saved at momentum 0 (no buffers) loaded with momentum on
    starts the buffers at zeros, as stock's init fills them."""
    ours = mfs.FusedSGD(0.1)
    params = ours.apply_gradients(_grads(0), _params())
    mx.eval(params, ours.state)
    path = str(tmp_path / "state.safetensors")
    mx.save_safetensors(path, dict(tree_flatten(ours.state)))
    loaded = tree_unflatten(list(mx.load(path).items()))
    resumed, stock = mfs.FusedSGD(0.1, momentum=0.9), optim.SGD(0.1, momentum=0.9)
    resumed.state = {**loaded, "w": {}, "b": {}}
    stock.state = {**loaded, "w": {}, "b": {}}
    a, b = dict(params), dict(params)
    for i in range(1, 3):
        a = resumed.apply_gradients(_grads(i), a)
        b = stock.apply_gradients(_grads(i), b)
        mx.eval(a, b, resumed.state, stock.state)
    _assert_same(a, b, "param")
    _assert_same(resumed.state, stock.state, "state")


@pytest.mark.parametrize(
    "bad, found",
    [(None, "holds None"), ([1, 2], "a list of 2 entries"), ("v", "a str")],
    ids=["None", "list", "str"],
)
def test_non_array_buffer_is_refused_by_name(bad, found):
    opt = mfs.FusedSGD(0.1, momentum=0.9)
    params = _params()
    params = opt.apply_gradients(_grads(0), params)
    mx.eval(params, opt.state)
    opt.state["w"]["v"] = bad
    before = {k: np.array(v) for k, v in tree_flatten(opt.state) if k != "w.v"}
    with pytest.raises(
        ValueError, match=f"momentum buffer 'w' must be an mx.array.*{found}"
    ):
        opt.apply_gradients(_grads(1), params)
    assert opt.state["w"]["v"] is bad
    for k, v in tree_flatten(opt.state):
        if k != "w.v":
            assert np.array_equal(np.array(v), before[k]), k


def test_numpy_buffer_is_accepted_as_stock_accepts_it():
    ours, stock = mfs.FusedSGD(0.1, momentum=0.9), optim.SGD(0.1, momentum=0.9)
    for opt in (ours, stock):
        opt.init(_params())
        opt.state["w"]["v"] = np.full(SHAPE, 0.25, np.float32)
    a = ours.apply_gradients(_grads(0), _params())
    b = stock.apply_gradients(_grads(0), _params())
    mx.eval(a, b)
    _assert_same(a, b, "param")
    assert isinstance(ours.state["w"]["v"], mx.array)
    assert_bitwise_equal(ours.state["w"]["v"], mx.array(stock.state["w"]["v"]), "v")


# --------------------------------------------------------------------------
# Random mixes of steps and changes, against an all-stock run
# --------------------------------------------------------------------------

ACTIONS = st.sampled_from(
    [
        "fused",
        "fused",
        "fused",
        "stock",
        "momentum",
        "weight_decay",
        "half_grads",
        "reset",
        "checkpoint",
    ]
)


@settings(
    max_examples=150,
    deadline=None,
    derandomize=os.environ.get("CI") == "true",
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(actions=st.lists(ACTIONS, min_size=1, max_size=12))
def test_mixed_steps_and_changes_follow_stock(actions):
    """FusedSGD and stock steps taking turns on one state (stock's steps run
    on FusedSGD's state, as after a checkpoint hand-off), momentum and weight
    decay switched on and off, half-precision gradients, params reset from
    outside, checkpoint round trips: after every step, the params and the
    buffers have the bits of a run of stock steps alone."""
    ours = mfs.FusedSGD(0.1, momentum=0.0)
    ref = optim.SGD(0.1, momentum=0.0)
    p_ours, p_ref = _params(), _params()
    dtype = mx.float32
    for i, action in enumerate(actions):
        if action == "momentum":
            ours.momentum = ref.momentum = 0.9 if ours.momentum == 0 else 0.0
            continue
        if action == "weight_decay":
            ours.weight_decay = ref.weight_decay = 1e-2 - ours.weight_decay
            continue
        if action == "half_grads":
            # Only once FusedSGD has its buffers: a buffer started when
            # momentum is switched on takes the dtype of that step's
            # gradient, where stock's took its first step's
            # (docs/guarantees.md, "Momentum buffers").
            if "v" in ours.state.get("w", {}):
                dtype = mx.bfloat16 if dtype == mx.float32 else mx.float32
            continue
        if action == "reset":  # e.g. model.load_weights
            p_ours = {k: v * 0.5 for k, v in p_ours.items()}
            p_ref = {k: v * 0.5 for k, v in p_ref.items()}
            continue
        if action == "checkpoint":
            state = tree_unflatten(list(dict(tree_flatten(ours.state)).items()))
            ours = mfs.FusedSGD(0.1, momentum=ours.momentum)
            ours.weight_decay = ref.weight_decay
            ours.state = state
            continue
        g = _grads(i, dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if action == "stock":
                stock = optim.SGD(0.1, momentum=ours.momentum)
                stock.weight_decay = ours.weight_decay
                stock.state = ours.state  # the hand-off: stock's init fills gaps
                p_ours = stock.apply_gradients(g, p_ours)
            else:
                p_ours = ours.apply_gradients(g, p_ours)
            p_ref = ref.apply_gradients(g, p_ref)
        mx.eval(p_ours, p_ref, ours.state, ref.state)
        _assert_same(p_ours, p_ref, f"step {i} ({action}) param")
        for k, v in tree_flatten(ours.state):
            if k.endswith(".v"):
                assert_bitwise_equal(
                    v, dict(tree_flatten(ref.state))[k], f"step {i} {k}"
                )


# --------------------------------------------------------------------------
# Master weights: a stale copy never overwrites the params
# --------------------------------------------------------------------------


def _half_params():
    return {"w": mx.array([0.9, 1.9, 2.9, -0.3], mx.bfloat16)}


def _half_grads(i):
    return {"w": mx.random.normal((4,), key=mx.random.key(200 + i)).astype(mx.bfloat16)}


def test_master_copy_after_stock_steps_gives_way_to_the_params():
    """FusedSGD(master_weights) -> checkpoint -> 5 stock steps (stock keeps
    the copy it does not know, untouched) -> FusedSGD again: a step with a
    zero gradient leaves the params as stock left them."""
    ours = mfs.FusedSGD(0.1, momentum=0.9, master_weights=True)
    p = ours.apply_gradients(_half_grads(0), _half_params())
    mx.eval(p, ours.state)
    stock = optim.SGD(0.1, momentum=0.9)
    stock.state = tree_unflatten(list(dict(tree_flatten(ours.state)).items()))
    for i in range(1, 6):
        p = stock.apply_gradients(_half_grads(i), p)
    mx.eval(p, stock.state)
    resumed = mfs.FusedSGD(0.1, master_weights=True)
    resumed.state = stock.state
    zero = {"w": mx.zeros((4,), mx.bfloat16)}
    after = resumed.apply_gradients(zero, p)
    mx.eval(after, resumed.state)
    assert_bitwise_equal(after["w"], p["w"], "params")
    # The copy is re-seeded from the params it met.
    assert_bitwise_equal(
        resumed.state["w"]["master"], p["w"].astype(mx.float32), "copy"
    )


@pytest.mark.parametrize("change", ["reset", "master_off_and_on"])
def test_params_changed_outside_restart_the_master_copy(change):
    """Params reset from outside (model.load_weights, say), or updated with
    master_weights off for a while: the next master-weights step starts from
    the params as they are, so its master copy is the float32 update of
    those params (the float32 run's bits)."""
    ours = mfs.FusedSGD(0.1, master_weights=True)
    p = ours.apply_gradients(_half_grads(0), _half_params())
    mx.eval(p, ours.state)
    if change == "reset":
        p = {"w": mx.array([5.0, -2.5, 0.125, 7.0], mx.bfloat16)}
    else:
        ours.master_weights = False
        for i in range(1, 3):
            p = ours.apply_gradients(_half_grads(i), p)
        mx.eval(p)
        ours.master_weights = True
    g = _half_grads(9)
    after = ours.apply_gradients(g, p)
    mx.eval(after, ours.state)
    ref = optim.SGD(0.1).apply_gradients(
        {"w": g["w"].astype(mx.float32)}, {"w": p["w"].astype(mx.float32)}
    )
    assert_bitwise_equal(ours.state["w"]["master"], ref["w"], "master copy")
    assert_bitwise_equal(after["w"], ref["w"].astype(mx.bfloat16), "params")


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=str)
def test_stale_elements_restart_one_by_one(dtype):
    """Element by element: where the param is its copy's rounding, the copy
    is used (its extra bits kept); elsewhere the param. The kernel and the
    composed fallback agree."""

    m = mx.random.normal((64,), key=mx.random.key(1)) * 4
    stale = mx.arange(64) % 4 == 1
    p = mx.where(stale, (m + 1).astype(dtype), m.astype(dtype))
    g = mx.random.normal((64,), key=mx.random.key(2)).astype(dtype)
    kw = dict(learning_rate=mx.array(0.01), weight_decay=1e-3)
    _, _, new_m = mfs.sgd_update_many([p], [g], [], master_params=[m], **kw)
    _, _, fallback_m = sgd_fallback([p], [g], [], master_params=[m], **kw)
    start = mx.where(stale, p.astype(mx.float32), m)
    expected = optim.SGD(0.01, weight_decay=1e-3).apply_gradients(
        {"w": g.astype(mx.float32)}, {"w": start}
    )["w"]
    assert_bitwise_equal(new_m[0], expected, "kernel")
    assert_bitwise_equal(fallback_m[0], expected, "fallback")
