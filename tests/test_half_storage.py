"""Master weights and stochastic rounding for float16/bfloat16 params.

Master weights: the float32 copy follows exactly the float32 SGD trajectory
(stock SGD on float32 params with the half gradients widened), and the param
is its rounding. Stochastic rounding: deterministic for a seed and a step,
each result one of the two bfloat16 neighbours, unbiased (the bounds below
are derived from Hoeffding's inequality, not tuned). On a toy problem whose
updates are below half a bfloat16 ulp, round to nearest stalls while both
make progress."""

import math

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_fused_sgd as mfs

from helpers import MLP, assert_bitwise_equal, sgd_fallback, to_numpy, train_steps

# Probability that a correct implementation fails a statistical bound below.
FAILURE_PROBABILITY = 1e-9


def hoeffding_bound(n: int, width: float = 1.0, weight_sq_sum: float = 1.0) -> float:
    """t with P(|mean of n independent zero-mean terms| >= t) <= FAILURE_PROBABILITY
    when each term lies in an interval of `width` (Hoeffding); for a martingale
    of weighted terms (Azuma) the squared weights sum to `weight_sq_sum`."""
    return width * math.sqrt(
        weight_sq_sum * math.log(2 / FAILURE_PROBABILITY) / (2 * n)
    )


def bf16_neighbours(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The bfloat16 values just below and just above each float32 |x| (toward
    zero and away from zero), as float64."""
    bits = x.astype(np.float32).view(np.uint32)
    down = (bits & np.uint32(0xFFFF0000)).view(np.float32).astype(np.float64)
    up = ((bits & np.uint32(0xFFFF0000)) + np.uint32(0x10000)).view(np.float32)
    return down, up.astype(np.float64)


# --------------------------------------------------------------------------
# Master weights
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=str)
@pytest.mark.parametrize(
    "cfg",
    [
        dict(momentum=0.9, weight_decay=1e-3),
        dict(momentum=0.8, dampening=0.25),
        dict(momentum=0.9, nesterov=True, max_grad_norm=0.5),
        dict(momentum=0.0, weight_decay=1e-2, maximize=True, grad_scale=8.0),
    ],
    ids=["momentum", "dampening", "nesterov+clip", "plain+maximize+scale"],
)
def test_master_weights_follow_the_float32_trajectory(dtype, cfg):
    """With float32 momentum, the master copies are bit for bit the params of
    the same training run in float32 on the widened half gradients."""
    mx.random.seed(3)
    model = MLP()
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    shadow = {k: v.astype(mx.float32) for k, v in tree_flatten(model.parameters())}
    fused = mfs.FusedSGD(0.05, master_weights=True, state_dtype=mx.float32, **cfg)
    plain = {
        k: v
        for k, v in cfg.items()
        if k not in ("max_grad_norm", "maximize", "grad_scale")
    }
    reference = optim.SGD(0.05, **plain)

    def widen(grads):
        return {k: g.astype(mx.float32) for k, g in tree_flatten(grads)}

    def transform(grads):
        # Feed the float32 reference the same (widened) gradients, transformed
        # the way the kernel transforms them.
        flat = widen(grads)
        if "grad_scale" in cfg:
            flat = {k: g / cfg["grad_scale"] for k, g in flat.items()}
        if "max_grad_norm" in cfg:
            # The reference uses the clip factor the fused step computes.
            norm = mfs.grad_norm([g for g in dict(tree_flatten(grads)).values()])
            factor = mx.minimum(cfg["max_grad_norm"] / (norm + 1e-6), 1.0)
            flat = {k: g * factor for k, g in flat.items()}
        if cfg.get("maximize"):
            flat = {k: -g for k, g in flat.items()}
        nonlocal shadow
        shadow = reference.apply_gradients(flat, shadow)
        return grads

    train_steps(model, fused, 6, mx.random.key(9), transform=transform)
    mx.eval(shadow)
    masters = dict(tree_flatten(fused.state))
    params = dict(tree_flatten(model.parameters()))
    for k, expected in shadow.items():
        assert_bitwise_equal(masters[f"{k}.master"], expected, k)
        assert_bitwise_equal(params[k], expected.astype(dtype), k)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=str)
def test_master_weights_with_half_momentum_match_the_composed_ops(dtype):
    keys = mx.random.split(mx.random.key(5), 4)
    m = [mx.random.normal((300,), key=keys[0]), mx.random.normal((7, 9), key=keys[1])]
    p = [x.astype(dtype) for x in m]
    g = [mx.random.normal(x.shape, key=keys[2]).astype(dtype) for x in m]
    v = [mx.random.normal(x.shape, key=keys[3]).astype(dtype) for x in m]
    kw = dict(learning_rate=0.1, momentum=0.9, weight_decay=1e-2, master_params=m)
    got = mfs.sgd_update_many(p, g, v, **kw)

    exp = sgd_fallback(
        p,
        g,
        v,
        learning_rate=mx.array(0.1),
        momentum=0.9,
        weight_decay=1e-2,
        master_params=m,
    )
    for a, b in zip(got[0] + got[1] + got[2], exp[0] + exp[1] + exp[2]):
        assert_bitwise_equal(a, b)
    assert all(x.dtype == mx.float32 for x in got[2])


def test_master_weights_state_layout_and_float32_params():
    model = {"w": mx.ones((4,), mx.bfloat16), "b": mx.ones((2,), mx.float32)}
    opt = mfs.FusedSGD(0.1, momentum=0.9, master_weights=True)
    new = opt.apply_gradients(
        {"w": mx.ones((4,), mx.bfloat16), "b": mx.ones((2,))}, model
    )
    assert set(opt.state["w"]) == {"v", "master"}
    assert opt.state["w"]["master"].dtype == mx.float32
    assert set(opt.state["b"]) == {"v"}  # float32 params need no copy
    assert_bitwise_equal(new["w"], opt.state["w"]["master"].astype(mx.bfloat16))


def test_master_weights_start_from_params_when_the_state_has_none():
    """A stock checkpoint (no master copies) resumes with copies of the
    params."""
    params = {"w": mx.array([1.0, 2.0, 3.0], mx.bfloat16)}
    grads = {"w": mx.array([0.5, -0.5, 1.0], mx.bfloat16)}
    stock = optim.SGD(0.1, momentum=0.9)
    stock.init(params)
    opt = mfs.FusedSGD(0.1, momentum=0.9, master_weights=True)
    opt.state = stock.state
    new = opt.apply_gradients(grads, params)
    expected = params["w"].astype(mx.float32) - 0.1 * grads["w"].astype(mx.float32)
    assert_bitwise_equal(opt.state["w"]["master"], expected)
    assert_bitwise_equal(new["w"], expected.astype(mx.bfloat16))


# --------------------------------------------------------------------------
# Stochastic rounding
# --------------------------------------------------------------------------


def _sr_step(p, g, seed, step, lr=1.0, **kw):
    out, _ = mfs.sgd_update_many(
        [p], [g], None, learning_rate=lr, rounding_seed=seed, rounding_step=step, **kw
    )
    return out[0]


def test_stochastic_rounding_is_deterministic_per_seed_and_step():
    k1, k2 = mx.random.split(mx.random.key(0))
    p = mx.random.normal((4096,), key=k1).astype(mx.bfloat16)
    g = (mx.random.normal((4096,), key=k2) * 1e-3).astype(mx.bfloat16)
    a = _sr_step(p, g, seed=7, step=3)
    assert_bitwise_equal(a, _sr_step(p, g, seed=7, step=3))
    differs = [
        _sr_step(p, g, seed=8, step=3),
        _sr_step(p, g, seed=7, step=4),
    ]
    for d in differs:
        assert not mx.array_equal(a, d).item()
    # The tensor's place in the update picks its stream: the same tensor at
    # index 0 and 1 of one call rounds differently.
    out, _ = mfs.sgd_update_many(
        [p, p], [g, g], None, learning_rate=1.0, rounding_seed=7, rounding_step=3
    )
    assert_bitwise_equal(out[0], a)
    assert not mx.array_equal(out[0], out[1]).item()
    # ... and does not depend on how tensors are chunked into primitives.
    out1, _ = mfs.sgd_update_many(
        [p, p],
        [g, g],
        None,
        learning_rate=1.0,
        rounding_seed=7,
        rounding_step=3,
        tensors_per_primitive=1,
    )
    assert_bitwise_equal(out1[1], out[1])


@pytest.mark.parametrize("scale", [1e-1, 1e-3, 1e-6], ids=lambda s: f"update{s}")
def test_stochastic_rounding_picks_a_neighbour_without_bias(scale):
    """Each result is the bfloat16 neighbour below or above the float32 value
    x the kernel rounds, and the mean error in units of the gap between them
    is within the Hoeffding bound for n terms in an interval of width 1."""
    n = 1 << 18
    k1, k2 = mx.random.split(mx.random.key(1))
    p = mx.random.normal((n,), key=k1).astype(mx.bfloat16)
    g = (mx.random.normal((n,), key=k2) * scale).astype(mx.bfloat16)
    lr = 0.75
    got = to_numpy(_sr_step(p, g, seed=123, step=0, lr=lr)).astype(np.float64)
    # The float32 value the kernel rounds (each op rounded once, no FMA).
    x = (to_numpy(p) - np.float32(lr) * to_numpy(g)).astype(np.float32)
    toward_zero, away = bf16_neighbours(x)
    exact = x.astype(np.float64)
    assert np.all((got == toward_zero) | (got == away))
    inexact = toward_zero != exact
    assert inexact.sum() > n // 4
    err = (got - exact)[inexact] / np.abs(away - toward_zero)[inexact]
    assert abs(err.mean()) <= hoeffding_bound(int(inexact.sum()))


@pytest.mark.parametrize("frac", [1 / 8, 1 / 4, 3 / 8, 5 / 8, 7 / 8])
@pytest.mark.parametrize("sign", [1, -1], ids=["positive", "negative"])
def test_stochastic_rounding_is_unbiased_where_nearest_is_not(frac, sign):
    """Values a fixed fraction of a gap above a bfloat16 value: round to
    nearest errs by -frac (or 1 - frac) every time; stochastic rounding goes
    away from zero with probability frac, so the mean error is within the
    Hoeffding bound of zero (and the frequency within the same bound of
    frac)."""
    n = 1 << 18
    gap = 2.0**-7  # bfloat16 spacing in [1, 2)
    k = mx.random.randint(0, 128, (n,), key=mx.random.key(2))
    p = (sign * (1.0 + k.astype(mx.float32) * gap)).astype(mx.bfloat16)
    # p - 1.0 * g = p + sign * frac * gap, exact in float32.
    g = mx.full((n,), -sign * frac * gap, mx.bfloat16)
    got = to_numpy(_sr_step(p, g, seed=99, step=5)).astype(np.float64)
    base = to_numpy(p).astype(np.float64)
    err = sign * (got - base) / gap - frac  # (1 - frac) or -frac
    assert np.all(np.isclose(err, 1 - frac) | np.isclose(err, -frac))
    bound = hoeffding_bound(n)
    assert abs(err.mean()) <= bound
    nearest = min(frac, 1 - frac)  # what round to nearest would be off by
    assert nearest > 10 * bound


def test_stochastic_rounding_keeps_nan_and_inf():
    p = mx.array([1.0, 2.0, 3.0, 3.3e38], mx.bfloat16)
    g = mx.array([float("nan"), float("inf"), -float("inf"), 0.0], mx.bfloat16)
    got = to_numpy(_sr_step(p, g, seed=1, step=1))
    assert np.isnan(got[0]) and got[1] == -np.inf and got[2] == np.inf
    assert np.isfinite(got[3])


# --------------------------------------------------------------------------
# The toy problem: updates below half a bfloat16 ulp
# --------------------------------------------------------------------------

DELTA = 1e-3  # the per-step update; half a bfloat16 ulp at 1.0 is 2**-8 ~ 0.0039
STEPS = 200
N = 4096


def _toy(**opts):
    """Maximize sum(DELTA * w) from w = 1: a constant gradient, so each step
    adds lr * bfloat16(DELTA) to every float32 value the kernel rounds."""
    params = {"w": mx.ones((N,), mx.bfloat16)}
    opt = mfs.FusedSGD(1.0, **opts)

    def loss(params):
        return -(params["w"] * mx.array(DELTA, mx.bfloat16)).sum()

    grad_fn = mx.grad(loss)
    for _ in range(STEPS):
        grads = grad_fn(params)
        params = opt.apply_gradients(grads, params)
        mx.eval(params, opt.state)
    return to_numpy(params["w"]).astype(np.float64)


def test_round_to_nearest_stalls_where_stochastic_rounding_and_master_weights_progress():
    step = float(np.float32(mx.array(DELTA, mx.bfloat16).item()))
    target = 1.0 + STEPS * step  # the exact value after STEPS updates
    gap = 2.0**-7  # bfloat16 spacing in [1, 2)

    nearest = _toy()
    assert np.all(nearest == 1.0), "round to nearest should stall at 1.0"

    master = _toy(master_weights=True)
    # The float32 copy accumulates with relative error ~STEPS * 2**-24; the
    # param is its rounding: within half a gap (plus that error) of target.
    assert np.all(np.abs(master - target) <= gap / 2 + STEPS * 2**-23)

    sr = _toy(stochastic_rounding=True, rounding_seed=11)
    # w_K = 1 + K*step + sum of K zero-mean rounding errors per element, each
    # in an interval of width `gap` (Azuma over all N*K of them).
    assert abs(sr.mean() - target) <= hoeffding_bound(N, gap, STEPS)
    assert sr.mean() > 1.0 + 0.9 * STEPS * step


# --------------------------------------------------------------------------
# Bad input: clear errors, nothing changed
# --------------------------------------------------------------------------


def test_master_weights_and_stochastic_rounding_are_alternatives():
    with pytest.raises(ValueError, match="alternatives"):
        mfs.FusedSGD(0.1, master_weights=True, stochastic_rounding=True)
    p = mx.ones((3,), mx.bfloat16)
    with pytest.raises(ValueError, match="not both"):
        mfs.sgd_update_many(
            [p],
            [p],
            learning_rate=0.1,
            master_params=[p.astype(mx.float32)],
            rounding_seed=1,
            rounding_step=0,
        )


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True, "0", None])
def test_bad_rounding_seed_is_refused(seed):
    with pytest.raises(ValueError, match="rounding_seed"):
        mfs.FusedSGD(0.1, stochastic_rounding=True, rounding_seed=seed)


def test_stochastic_rounding_of_float16_params_is_refused_and_nothing_changes():
    params = {"a": mx.ones((3,), mx.bfloat16), "b": mx.ones((3,), mx.float16)}
    grads = {k: mx.ones_like(v) for k, v in params.items()}
    opt = mfs.FusedSGD(0.1, momentum=0.9, stochastic_rounding=True)
    before = tree_flatten(opt.state)
    with pytest.raises(ValueError, match="param 'b' is float16"):
        opt.apply_gradients(grads, params)
    after = tree_flatten(opt.state)
    assert [k for k, _ in after] == [k for k, _ in before]
    for (k, a), (_, b) in zip(after, before):
        assert_bitwise_equal(a, b, k)
    with pytest.raises(ValueError, match=r"param\[1\] is float16"):
        mfs.sgd_update_many(
            list(params.values()),
            list(grads.values()),
            learning_rate=0.1,
            rounding_seed=0,
            rounding_step=0,
        )


@pytest.mark.parametrize(
    "master,match",
    [
        (mx.ones((3,), mx.bfloat16), "must be float32"),
        (mx.ones((4,)), "shape"),
    ],
    ids=["dtype", "shape"],
)
def test_bad_master_copy_is_refused(master, match):
    p = mx.ones((3,), mx.bfloat16)
    with pytest.raises(ValueError, match=match):
        mfs.sgd_update_many([p], [p], learning_rate=0.1, master_params=[master])


def test_bad_master_in_optimizer_state_leaves_everything_untouched():
    params = {"w": mx.ones((3,), mx.bfloat16)}
    grads = {"w": mx.ones((3,), mx.bfloat16)}
    opt = mfs.FusedSGD(0.1, momentum=0.9, master_weights=True)
    params = opt.apply_gradients(grads, params)
    mx.eval(params, opt.state)
    before = {k: mx.array(v) for k, v in tree_flatten(opt.state)}
    opt.state["w"]["master"] = mx.ones((3,), mx.float16)
    bad = opt.state["w"]["master"]
    with pytest.raises(
        ValueError,
        match="master copy 'w' has dtype float16; a master copy must be float32",
    ):
        opt.apply_gradients(grads, params)
    assert opt.state["w"]["master"] is bad
    assert opt.state["step"].item() == before["step"].item()
    assert_bitwise_equal(opt.state["w"]["v"], before["w.v"])


def test_master_copy_for_a_float32_param_is_refused():
    p = mx.ones((3,))
    with pytest.raises(ValueError, match="float32 param"):
        mfs.sgd_update_many([p], [p], learning_rate=0.1, master_params=[p])
    with pytest.raises(ValueError, match="one entry per param"):
        mfs.sgd_update_many([p, p], [p, p], learning_rate=0.1, master_params=[None])


def test_stochastic_rounding_needs_an_integer_step():
    p = mx.ones((3,), mx.bfloat16)
    with pytest.raises(ValueError, match="rounding_step"):
        mfs.sgd_update_many([p], [p], learning_rate=0.1, rounding_seed=0)
    with pytest.raises(ValueError, match="rounding_step must be an integer"):
        mfs.sgd_update_many(
            [p], [p], learning_rate=0.1, rounding_seed=0, rounding_step=mx.array(1.5)
        )


@pytest.mark.parametrize(
    "seed,step", [(0, 0), (2**63 + 5, 2**40 + 3)], ids=["small", "large"]
)
def test_composed_fallback_rounds_stochastically_like_the_kernels(seed, step):
    """The fallback for GPUs without our kernels (stock ops) draws the same
    random bits and rounds the same way, bit for bit, strided and float32
    params included (float32 params are not rounded)."""

    keys = mx.random.split(mx.random.key(6), 6)
    p = [
        mx.random.normal((1000,), key=keys[0]).astype(mx.bfloat16),
        mx.random.normal((9, 7), key=keys[1]).astype(mx.bfloat16).T,
        mx.random.normal((33,), key=keys[2]),
    ]
    g = [(mx.random.normal(x.shape, key=keys[3]) * 1e-3).astype(x.dtype) for x in p]
    v = [mx.random.normal(x.shape, key=keys[4]).astype(x.dtype) for x in p]
    kw = dict(momentum=0.9, weight_decay=1e-2, rounding_seed=seed)
    rstep = mx.array(step, mx.uint64)
    got = sgd_fallback(p, g, v, learning_rate=mx.array(0.5), rounding_step=rstep, **kw)
    want = mfs.sgd_update_many(p, g, v, learning_rate=0.5, rounding_step=rstep, **kw)
    for a, b in zip(got[0] + got[1], want[0] + want[1]):
        assert_bitwise_equal(a, b)


def test_apply_single_refuses_the_storage_options():
    for opts in (dict(master_weights=True), dict(stochastic_rounding=True)):
        opt = mfs.FusedSGD(0.1, **opts)
        with pytest.raises(ValueError, match="apply_single"):
            opt.apply_single(mx.ones(2, mx.bfloat16), mx.ones(2, mx.bfloat16), {})


def test_scheduled_stochastic_rounding_draws_from_the_step():
    p = mx.random.normal((999,), key=mx.random.key(4)).astype(mx.bfloat16)
    g = (mx.random.normal((999,), key=mx.random.key(5)) * 1e-3).astype(mx.bfloat16)
    sched = mfs.step_decay(0.5, 0.9, 3)
    step = mx.array(7, mx.uint64)
    a, _ = mfs.sgd_update_many_scheduled(
        [p], [g], step=step, schedule=sched, rounding_seed=4
    )
    b, _ = mfs.sgd_update_many(
        [p], [g], learning_rate=sched(step), rounding_seed=4, rounding_step=7
    )
    assert_bitwise_equal(a[0], b[0])


@pytest.mark.parametrize("mode", ["master", "stochastic"])
def test_strided_inputs_give_the_contiguous_result(mode):
    """Transposed params, grads, momentum buffers and master copies take the
    strided loop; its bits are those of the same values made contiguous (the
    random bits follow the element's row-major index)."""
    keys = mx.random.split(mx.random.key(8), 4)
    base = [mx.random.normal((37, 29), key=k) for k in keys]
    p, g, v = (x.astype(mx.bfloat16).T for x in base[:3])
    m = base[3].T
    kw = dict(learning_rate=0.05, momentum=0.9, weight_decay=1e-2)
    if mode == "master":
        kw["master_params"] = [m]
        contiguous_kw = dict(kw, master_params=[mx.contiguous(m)])
    else:
        kw.update(rounding_seed=17, rounding_step=4)
        contiguous_kw = kw
    got = mfs.sgd_update_many([p], [g], [v], **kw)
    want = mfs.sgd_update_many(
        [mx.contiguous(p)], [mx.contiguous(g)], [mx.contiguous(v)], **contiguous_kw
    )
    for a, b in zip(sum(got, []), sum(want, [])):
        assert_bitwise_equal(a, b)
