"""Differential fuzzing (hypothesis) of FusedSGD against stock optim.SGD:
random trees (dicts, lists, tuples, namedtuples), gradient layouts
(contiguous, transposed, sliced, broadcast), option combinations and edge
scalars, with refused steps interleaved. After every step the params and
the state have stock's bits (float32, CPU), and ``optimizer.state`` is still
the same object; after a refused step nothing has changed."""

import math
import os
from collections import namedtuple

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx.utils import tree_flatten, tree_map

import mlx_fused_sgd as mfs

from helpers import to_numpy

Pair = namedtuple("Pair", ["first", "second"])

SETTINGS = settings(
    max_examples=1500,
    deadline=None,
    # CI replays a fixed set of examples (a run must not fail by chance);
    # local runs explore new ones.
    derandomize=os.environ.get("CI") == "true",
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

LAYOUTS = ["contiguous", "transposed", "sliced", "broadcast"]


@st.composite
def leaf(draw):
    ndim = draw(st.integers(0, 3))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    layout = draw(st.sampled_from(LAYOUTS))
    return (shape, layout)


def trees():
    keys = st.sampled_from(["a", "b", "w", "bias", "layers"])
    return st.recursive(
        leaf(),
        lambda children: st.one_of(
            st.dictionaries(keys, children, min_size=1, max_size=3),
            st.lists(children, min_size=1, max_size=3),
            st.lists(children, min_size=1, max_size=3).map(tuple),
            st.tuples(children, children).map(lambda t: Pair(*t)),
        ),
        max_leaves=8,
    )


def _map_spec(spec, fn):
    """``spec`` (a tree of (shape, layout) leaves) with each leaf mapped."""
    if isinstance(spec, dict):
        return {k: _map_spec(v, fn) for k, v in spec.items()}
    if isinstance(spec, Pair):
        return Pair(*(_map_spec(v, fn) for v in spec))
    if isinstance(spec, (list, tuple)) and not _is_leaf(spec):
        return type(spec)(_map_spec(v, fn) for v in spec)
    return fn(spec)


def _is_leaf(spec):
    return (
        isinstance(spec, tuple)
        and len(spec) == 2
        and isinstance(spec[0], tuple)
        and spec[1] in LAYOUTS
    )


def _laid_out(values: mx.array, layout: str, rng) -> mx.array:
    """``values`` (its shape, these values) in ``layout``."""
    shape = values.shape
    if layout == "transposed" and len(shape) >= 2:
        return mx.swapaxes(mx.array(np.swapaxes(to_numpy(values), -1, -2)), -1, -2)
    if layout == "sliced" and len(shape) >= 1:
        wide = np.zeros((*shape[:-1], 2 * shape[-1]), np.float32)
        wide[..., ::2] = to_numpy(values)
        return mx.array(wide)[..., ::2]
    if layout == "broadcast" and len(shape) >= 1:
        row = values[(0,) * (len(shape) - 1)] if len(shape) > 1 else values
        return mx.broadcast_to(row, shape)
    return values


def _gradients(spec, rng, special, dtype=None):
    """Random gradients for ``spec``, float32 or all of ``dtype`` (a half
    type: the float32 params then have half gradients)."""

    def make(leaf_spec):
        shape, layout = leaf_spec
        values = rng.standard_normal(shape).astype(np.float32)
        if special and values.size:
            values.flat[rng.integers(values.size)] = rng.choice(
                [np.nan, np.inf, -np.inf, 0.0, 1e-40, 3e38]
            )
        g = _laid_out(mx.array(values), layout, rng)
        return g if dtype is None else g.astype(getattr(mx, dtype))

    return _map_spec(spec, make)


def _same(a: mx.array, b: mx.array, what: str) -> None:
    """Same dtype, shape and bits; NaN where the other has NaN."""
    assert a.dtype == b.dtype and a.shape == b.shape, what
    na, nb = to_numpy(a).reshape(-1), to_numpy(b).reshape(-1)
    bits = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[na.itemsize]
    both_nan = (
        np.isnan(na) & np.isnan(nb)
        if np.issubdtype(na.dtype, np.floating)
        else np.zeros(na.shape, bool)
    )
    differ = (na.view(bits) != nb.view(bits)) & ~both_nan
    assert not differ.any(), f"{what}: {na[differ][:3]} vs {nb[differ][:3]}"


def _bad_tree(grads, kind):
    """A gradient tree the step must refuse (None: this tree has no such
    defect)."""
    flat = tree_flatten(grads)
    if kind == "shape":
        path, g = flat[0]
        return _replace(grads, path.split("."), mx.zeros((*g.shape, 2)))
    if kind == "dtype":
        path, g = flat[-1]
        return _replace(grads, path.split("."), mx.zeros(g.shape, mx.int32))
    if kind == "not_an_array":
        path, _ = flat[0]
        return _replace(grads, path.split("."), 1.5)
    return None


def _replace(tree, keys, value):
    if not keys:
        return value
    k, rest = keys[0], keys[1:]
    if isinstance(tree, dict):
        return {**tree, k: _replace(tree[k], rest, value)}
    items = list(tree)
    items[int(k)] = _replace(items[int(k)], rest, value)
    return Pair(*items) if isinstance(tree, Pair) else type(tree)(items)


@st.composite
def options(draw):
    momentum = draw(st.sampled_from([0.0, 0.9, 0.5]))
    dampening = draw(st.sampled_from([0.0, 0.1])) if momentum else 0.0
    nesterov = bool(momentum) and dampening == 0 and draw(st.booleans())
    return dict(
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        weight_decay=draw(st.sampled_from([0.0, 1e-3, -0.25])),
        maximize=draw(st.booleans()),
        grad_scale=draw(st.sampled_from([None, 1024.0, 3.0, 1e-30])),
        skip_nonfinite=draw(st.booleans()),
        learning_rate=draw(
            st.sampled_from(["step_decay", 0.1, 1e-30, 3e38, 2**31, -0.5])
        ),
        grad_dtype=draw(st.sampled_from([None, None, "float16", "bfloat16"])),
    )


def _stock_view(grads, opts):
    """The gradients stock sees for FusedSGD's maximize and grad_scale:
    negated, then divided (the kernel's order, in float32); a half gradient
    updated in its own dtype (no weight decay) is rounded back to it."""

    def fn(g):
        dtype = g.dtype
        if opts["maximize"]:
            g = -g
        if opts["grad_scale"] is not None:
            g = g.astype(mx.float32) / mx.array(opts["grad_scale"], mx.float32)
            if opts["weight_decay"] == 0:
                g = g.astype(dtype)
        return g

    return tree_map(fn, grads)


def _finite(grads) -> bool:
    return all(bool(np.isfinite(to_numpy(g)).all()) for _, g in tree_flatten(grads))


@SETTINGS
@pytest.mark.filterwarnings("ignore:FusedSGD. param")
@given(
    spec=trees(),
    opts=options(),
    plan=st.lists(
        st.sampled_from(["good", "special", "shape", "dtype", "not_an_array"]),
        min_size=1,
        max_size=5,
    ),
    seed=st.integers(0, 2**16),
)
def test_fused_sgd_against_stock(spec, opts, plan, seed):
    spec = {"model": spec}  # parameters are a dict at the root, as a model's
    if mx.default_device() == mx.gpu:
        pytest.skip("bit-for-bit against stock is a CPU promise")
    rng = np.random.default_rng(seed)
    params = _map_spec(
        spec, lambda s: mx.array(rng.standard_normal(s[0]).astype(np.float32))
    )
    lr = opts["learning_rate"]
    make_lr = (lambda m: m.step_decay(0.1, 0.5, 2)) if lr == "step_decay" else None
    hyper = {k: opts[k] for k in ("momentum", "dampening", "nesterov", "weight_decay")}
    ours = mfs.FusedSGD(
        make_lr(mfs) if make_lr else lr,
        maximize=opts["maximize"],
        grad_scale=opts["grad_scale"],
        skip_nonfinite=opts["skip_nonfinite"],
        **hyper,
    )
    stock = optim.SGD(make_lr(optim) if make_lr else float(lr), **hyper)
    state_object = ours.state
    p_ours = p_stock = params
    for kind in plan:
        grads = _gradients(spec, rng, kind == "special", opts["grad_dtype"])
        bad = _bad_tree(grads, kind)
        if bad is not None:
            before = dict(tree_flatten(ours.state)), dict(tree_flatten(p_ours))
            with pytest.raises((ValueError, TypeError)):
                ours.apply_gradients(bad, p_ours)
            after = dict(tree_flatten(ours.state)), dict(tree_flatten(p_ours))
            for b, a in zip(before, after):
                assert a.keys() == b.keys()
                for k in b:
                    _same(a[k], b[k], k)
        else:
            p_ours = ours.apply_gradients(grads, p_ours)
            skipped = opts["skip_nonfinite"] and not _finite(grads)
            if not skipped:
                p_stock = stock.apply_gradients(_stock_view(grads, opts), p_stock)
            mx.eval(p_ours, p_stock, ours.state, stock.state)
            assert ours.last_step_skipped.item() == skipped
            for (k, a), (_, b) in zip(tree_flatten(p_ours), tree_flatten(p_stock)):
                _same(a, b, k)
            stock_state = dict(tree_flatten(stock.state))
            for k, v in tree_flatten(ours.state):
                if k in ("grad_scale", "last_step_skipped"):
                    continue
                if k not in stock_state:
                    # Stock never stepped (every step so far skipped): its
                    # state is not initialized; ours holds zero momentum.
                    assert k.endswith(".v") and not to_numpy(v).any(), k
                    continue
                _same(v, stock_state[k], k)
        assert ours.state is state_object
        assert type(p_ours) is type(params)
    assert not math.isnan(ours.state["step"].item())
