"""Every layout MLX hands the optimizer gives the bits of the same values
laid out row-contiguously: transposed gradients (as ``nn.value_and_grad``
returns every ``nn.Linear`` weight's), batched transposes, slices,
broadcasts, and params, momentum buffers and master copies in any of these.
The layout paths only move data; the arithmetic is the shared per-element
math, so the results must be identical bit for bit."""

import itertools

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

import mlx_fused_sgd as mfs
from mlx_fused_sgd.examples import models

from helpers import assert_bitwise_equal

# Sizes that cross the CPU loop's 8 x 8 blocks and 64 x 128 tiles with
# remainders, and one large enough to be split across threads.
LAYOUTS = {
    # name: (make a strided view of an array made by `make(shape)`, shape)
    "transposed": (lambda make: make((203, 77)).T, None),
    "transposed_tiles": (lambda make: make((131, 259)).T, None),
    "transposed_threads": (lambda make: make((700, 390)).T, None),
    "batched_transposed": (lambda make: make((3, 45, 70)).swapaxes(1, 2), None),
    "leading_transposed": (lambda make: make((9, 4, 33)).transpose(1, 0, 2), None),
    "permuted_4d": (lambda make: make((5, 6, 7, 8)).transpose(3, 1, 0, 2), None),
    "sliced_step": (lambda make: make((40, 190))[:, ::2], None),
    "sliced_columns": (lambda make: make((50, 100))[3:47, 7:88], None),
    "sliced_1d": (lambda make: make((20001,))[::3], None),
    "size_one_axes": (lambda make: make((1, 60, 1, 33)).swapaxes(1, 3), None),
}


def _random(shape, dtype, key):
    return (mx.random.normal(shape, key=key) * 0.1).astype(dtype)


def _strided(name, dtype, key):
    view, _ = LAYOUTS[name]
    x = view(lambda shape: _random(shape, dtype, key))
    mx.eval(x)
    return x


def _contiguous(x):
    y = mx.contiguous(x)
    mx.eval(y)
    assert memoryview(y).c_contiguous
    return y


def _is_strided(x):
    return not memoryview(x).c_contiguous


VARIANTS = {
    "plain": dict(momentum=0.0),
    "momentum_wd": dict(momentum=0.9, weight_decay=1e-2),
    "dampening": dict(momentum=0.8, dampening=0.3),
    "nesterov_scaled": dict(momentum=0.9, nesterov=True, grad_scale=8.0, maximize=True),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("operand", ["grad", "param", "velocity", "all"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_strided_operand_gives_contiguous_bits(layout, operand, dtype):
    keys = mx.random.split(mx.random.key(7), 3)
    strided = [_strided(layout, dtype, k) for k in keys]
    contiguous = [_contiguous(x) for x in strided]
    assert _is_strided(strided[0]), "the layout under test must not be row-contiguous"
    which = {"param": 0, "grad": 1, "velocity": 2}
    use = [
        strided[i] if operand in ("all", name) else contiguous[i]
        for name, i in which.items()
    ]
    for name, kwargs in VARIANTS.items():
        got = mfs.sgd_update(*use, learning_rate=0.05, **kwargs)
        want = mfs.sgd_update(*contiguous, learning_rate=0.05, **kwargs)
        mx.eval(got, want)
        assert_bitwise_equal(got[0], want[0], f"{name}: param")
        assert_bitwise_equal(got[1], want[1], f"{name}: velocity")


def _transposed_at(rows, cols, offset, dtype, key):
    """A transposed (rows, cols) view whose data starts ``offset`` elements
    into its buffer: each column's run then starts at another place within
    the CPU gather's aligned blocks."""
    flat = _random((offset + rows * cols,), dtype, key)
    x = mx.as_strided(flat, (rows, cols), (1, rows), offset)
    mx.eval(x)
    return x


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("rows", [8, 13, 264, 515])
def test_transposed_runs_at_every_alignment(dtype, rows):
    """Transposed operands whose columns start anywhere within the CPU
    gather's 8-element blocks (MLX's own buffers start 24 bytes into a page;
    a view can start anywhere), in tiles of 8 rows, a few more, and several
    tiles with remainders: the contiguous bits."""
    for offset in range(9):
        keys = mx.random.split(mx.random.key(offset), 3)
        g = _transposed_at(rows, 37, offset, dtype, keys[0])
        p = _transposed_at(rows, 37, 8 - offset, dtype, keys[1])
        v = _random((rows, 37), dtype, keys[2])
        assert _is_strided(g) and _is_strided(p)
        kw = dict(learning_rate=0.05, momentum=0.9, weight_decay=1e-2)
        got = mfs.sgd_update(p, g, v, **kw)
        want = mfs.sgd_update(_contiguous(p), _contiguous(g), v, **kw)
        mx.eval(got, want)
        assert_bitwise_equal(got[0], want[0], f"offset {offset}: param")
        assert_bitwise_equal(got[1], want[1], f"offset {offset}: velocity")


@pytest.mark.parametrize(
    "layout", ["transposed_tiles", "batched_transposed", "sliced_step"]
)
def test_float32_strided_matches_stock(layout):
    """Stock's ops on the same strided arrays: the same bits."""
    keys = mx.random.split(mx.random.key(3), 2)
    p, g = (_strided(layout, mx.float32, k) for k in keys)
    stock = optim.SGD(0.05, momentum=0.9, weight_decay=1e-3)
    fused = mfs.FusedSGD(0.05, momentum=0.9, weight_decay=1e-3)
    ps, pf = {"w": p}, {"w": p}
    for _ in range(3):
        ps = stock.apply_gradients({"w": g}, ps)
        pf = fused.apply_gradients({"w": g}, pf)
        mx.eval(ps, pf, stock.state, fused.state)
    assert_bitwise_equal(pf["w"], ps["w"], "param")
    assert_bitwise_equal(fused.state["w"]["v"], stock.state["w"]["v"], "momentum")


@pytest.mark.parametrize("grad_shape", [(77,), (1, 77), (203, 1), (), (1,)], ids=str)
def test_broadcast_gradients(grad_shape):
    """Gradients that broadcast to the param: as stock broadcasts them."""
    p = _random((203, 77), mx.float32, mx.random.key(1))
    g = _random(grad_shape, mx.float32, mx.random.key(2))
    g_full = _contiguous(mx.broadcast_to(g, p.shape))
    got = mfs.sgd_update(p, g, None, learning_rate=0.1, momentum=0.9)
    want = mfs.sgd_update(p, g_full, None, learning_rate=0.1, momentum=0.9)
    mx.eval(got, want)
    assert_bitwise_equal(got[0], want[0], "param")
    assert_bitwise_equal(got[1], want[1], "velocity")


@pytest.mark.parametrize(
    "layout", ["transposed_tiles", "batched_transposed", "sliced_columns"]
)
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_half_storage_options_on_strided_inputs(layout, dtype):
    """Master weights (a strided master copy too) and stochastic rounding:
    the bits of the contiguous run; the rounding bits follow the element's
    row-major index, whatever the layout."""
    keys = mx.random.split(mx.random.key(11), 4)
    p, g, v = (_strided(layout, dtype, k) for k in keys[:3])
    master = _strided(layout, mx.float32, keys[3])
    cp, cg, cv, cm = (_contiguous(x) for x in (p, g, v, master))
    kw = dict(learning_rate=0.05, momentum=0.9, weight_decay=1e-3)
    got = mfs.sgd_update_many([p], [g], [v], master_params=[master], **kw)
    want = mfs.sgd_update_many([cp], [cg], [cv], master_params=[cm], **kw)
    mx.eval(got, want)
    for a, b, what in zip(itertools.chain(*got), itertools.chain(*want), "pvm"):
        assert_bitwise_equal(a, b, what)
    if dtype == mx.bfloat16:
        sr = dict(rounding_seed=5, rounding_step=17, **kw)
        got = mfs.sgd_update_many([p], [g], [v], **sr)
        want = mfs.sgd_update_many([cp], [cg], [cv], **sr)
        mx.eval(got, want)
        for a, b, what in zip(itertools.chain(*got), itertools.chain(*want), "pv"):
            assert_bitwise_equal(a, b, what)


def test_skipped_step_keeps_strided_inputs():
    """A skipped step copies strided params and momentum buffers exactly."""
    p = _strided("transposed_tiles", mx.float32, mx.random.key(1))
    v = _strided("transposed_tiles", mx.float32, mx.random.key(3))
    g = _strided("transposed_tiles", mx.float32, mx.random.key(4))
    new_p, new_v = mfs.sgd_update(
        p, g, v, learning_rate=0.1, momentum=0.9, skip=mx.array(True)
    )
    mx.eval(new_p, new_v)
    assert_bitwise_equal(new_p, _contiguous(p), "param")
    assert_bitwise_equal(new_v, _contiguous(v), "velocity")


# ---------------------------------------------------------------------------
# Real models: gradients as nn.value_and_grad returns them
# ---------------------------------------------------------------------------

WORKLOADS = {
    "mlp": lambda: models.mlp([75, 131, 203, 10], batch=16),
    "gpt": lambda: models.gpt(97, 72, heads=4, layers=2, context=16, batch=4),
    "convnet": lambda: models.convnet([3, 12, 20], classes=10, image=16, batch=4),
}

STOCK_CONFIGS = ["momentum_wd_step_decay", "nesterov", "dampening"]


def _optimizer(module, name):
    if name == "momentum_wd_step_decay":
        return module.SGD(
            module.step_decay(0.1, 0.9, 3), momentum=0.9, weight_decay=1e-4
        )
    if name == "nesterov":
        return module.SGD(0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    return module.SGD(0.05, momentum=0.8, dampening=0.25)


class _Fused:
    """The package under stock's names, for _optimizer."""

    SGD = mfs.FusedSGD
    step_decay = staticmethod(mfs.step_decay)


def train(workload, optimizer, steps=6, dtype=None, contiguous=False):
    """`steps` training steps of a WORKLOADS model; the gradients as
    nn.value_and_grad returns them, or their contiguous copies. Returns the
    model, the optimizer and the most gradients of a step that were not
    row-contiguous as returned."""
    mx.random.seed(0)
    w = WORKLOADS[workload]()
    if dtype is not None:
        w.model.set_dtype(dtype)
    mx.eval(w.model.parameters())
    loss_and_grad = nn.value_and_grad(w.model, w.loss)
    key = mx.random.key(42)
    strided = 0
    for _ in range(steps):
        key, sub = mx.random.split(key)
        _, grads = loss_and_grad(w.model, *w.batch(sub))
        mx.eval(grads)
        strided = max(strided, sum(_is_strided(g) for _, g in tree_flatten(grads)))
        if contiguous:
            grads = _tree_contiguous(grads)
        optimizer.update(w.model, grads)
        mx.eval(w.model.parameters(), optimizer.state)
    return w.model, optimizer, strided


def _assert_same_training(model_a, opt_a, model_b, opt_b):
    """Params and optimizer state (every entry) bit for bit."""
    for tree_a, tree_b, what in (
        (model_a.parameters(), model_b.parameters(), "param"),
        (opt_a.state, opt_b.state, "state"),
    ):
        a, b = dict(tree_flatten(tree_a)), dict(tree_flatten(tree_b))
        assert a.keys() == b.keys()
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{what} {k}")


@pytest.mark.parametrize("workload", list(WORKLOADS))
@pytest.mark.parametrize("config", STOCK_CONFIGS)
def test_real_models_bit_identical_to_stock(workload, config):
    model_f, opt_f, strided = train(workload, _optimizer(_Fused, config))
    model_s, opt_s, _ = train(workload, _optimizer(optim, config))
    assert strided >= 1, "the model's gradients must include transposed ones"
    _assert_same_training(model_f, opt_f, model_s, opt_s)


OPTIONS = {
    "maximize": dict(maximize=True),
    "grad_scale_skip": dict(grad_scale=64.0, skip_nonfinite=True),
    "clip": dict(max_grad_norm=0.05),
    "float32_state": dict(state_dtype=mx.float32),
    "master_weights": dict(master_weights=True),
    "stochastic_rounding": dict(stochastic_rounding=True, rounding_seed=3),
}


@pytest.mark.parametrize("workload", ["mlp", "gpt"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_real_models_every_option_layout_free(workload, option):
    """Options stock has no counterpart for: training on the gradients as
    MLX returns them gives the bits of training on their contiguous copies
    (in bfloat16 for the half-precision options)."""
    half = option in ("float32_state", "master_weights", "stochastic_rounding")
    dtype = mx.bfloat16 if half else None

    def make():
        return mfs.FusedSGD(0.05, momentum=0.9, weight_decay=1e-4, **OPTIONS[option])

    model_a, opt_a, strided = train(workload, make(), steps=5, dtype=dtype)
    model_b, opt_b, _ = train(workload, make(), steps=5, dtype=dtype, contiguous=True)
    assert strided >= 1
    _assert_same_training(model_a, opt_a, model_b, opt_b)


def _tree_contiguous(tree):
    out = tree_map(mx.contiguous, tree)
    mx.eval(out)
    return out


def test_layout_tests_are_not_vacuous():
    """The comparison used above sees a one-element difference."""
    p = _strided("transposed_tiles", mx.float32, mx.random.key(1))
    q = mx.array(np.array(p)) + 0
    q[5, 3] = q[5, 3] + 1
    with pytest.raises(AssertionError, match="differ"):
        assert_bitwise_equal(_contiguous(p), q, "param")


@pytest.mark.parametrize(
    "layout", ["transposed_threads", "batched_transposed", "sliced_step"]
)
def test_gradient_reads_on_strided_gradients(layout):
    """The non-finite check finds a NaN wherever it sits in a strided
    gradient, and the norm matches the contiguous copy's (the order of the
    double-precision sum differs, so within float32 rounding)."""
    g = _strided(layout, mx.float32, mx.random.key(5))
    assert not mfs.grads_nonfinite([g]).item()
    norm = mfs.grad_norm([g]).item()
    want = mfs.grad_norm([_contiguous(g)]).item()
    assert norm == pytest.approx(want, rel=2**-23)
    host = np.array(g)
    for index in [(0,) * g.ndim, tuple(s - 1 for s in g.shape)]:
        bad = host.copy()
        bad[index] = np.nan
        base = mx.array(bad)
        # The same layout as g, holding the NaN at `index`.
        view, _ = LAYOUTS[layout]
        shaped = view(lambda shape, b=bad: mx.array(_inverse(layout, b, shape)))
        assert np.array_equal(np.isnan(np.array(shaped)), np.isnan(np.array(base)))
        assert mfs.grads_nonfinite([shaped]).item(), f"NaN at {index} missed"


def _inverse(layout, values, base_shape):
    """A base array of `base_shape` whose LAYOUTS[layout] view is `values`
    (where the view does not cover the base, zeros)."""
    base = np.zeros(base_shape, np.float32)
    index = np.arange(base.size).reshape(base_shape)
    view, _ = LAYOUTS[layout]
    positions = np.array(view(lambda shape: mx.array(index))).reshape(-1)
    base.reshape(-1)[positions] = values.reshape(-1)
    return base


@pytest.mark.parametrize("shape", [(5, 0), (0, 5), (3, 4, 0), (2, 0, 3)], ids=str)
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_empty_tensors_in_strided_layouts(shape, dtype):
    """An axis of size 0 in a transposed layout: no tiles, no work, empty
    results (once a division by zero in the tile plan)."""
    p = mx.zeros(shape, dtype)
    g = mx.zeros(shape[:-2] + (shape[-1], shape[-2]), dtype).swapaxes(-1, -2)
    v = mx.zeros(shape[:-2] + (shape[-1], shape[-2]), dtype).swapaxes(-1, -2)
    new_p, new_v = mfs.sgd_update(p, g, v, learning_rate=0.1, momentum=0.9)
    mx.eval(new_p, new_v)
    assert new_p.shape == shape and new_v.shape == shape


def test_half_params_float32_buffers_with_odd_tiles():
    """A bfloat16 gradient gathered next to a float32 momentum buffer and
    master copy, in tiles of an odd number of elements: the float32 buffers
    stay aligned (UBSan checks this under .ci/sanitize) and the bits are the
    contiguous ones."""
    keys = mx.random.split(mx.random.key(4), 4)
    # One gathered bfloat16 buffer (the gradient: 7 x 13 = 91 elements, 182
    # bytes) before the float32 ones; the param is read in place.
    p = _random((7, 13), mx.bfloat16, keys[0])
    g = _random((13, 7), mx.bfloat16, keys[1]).T
    v = _random((13, 7), mx.float32, keys[2]).T
    m = _random((13, 7), mx.float32, keys[3]).T
    kw = dict(learning_rate=0.05, momentum=0.9, master_params=[m])
    got = mfs.sgd_update_many([p], [g], [v], **kw)
    want = mfs.sgd_update_many(
        [_contiguous(p)],
        [_contiguous(g)],
        [_contiguous(v)],
        **{**kw, "master_params": [_contiguous(m)]},
    )
    mx.eval(got, want)
    for a, b, what in zip(itertools.chain(*got), itertools.chain(*want), "pvm"):
        assert_bitwise_equal(a, b, what)
