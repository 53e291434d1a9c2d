"""The functional API and the two C++ ops behind it."""

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest

import mlx_fused_sgd as mfs
from mlx_fused_sgd import _ext

from helpers import assert_bitwise_equal


def _stock_step(
    p, g, v, lr, momentum=0.0, weight_decay=0.0, dampening=0.0, nesterov=False
):
    """One stock SGD step on one tensor, starting from velocity v."""
    opt = optim.SGD(
        lr,
        momentum=momentum,
        weight_decay=weight_decay,
        dampening=dampening,
        nesterov=nesterov,
    )
    opt.init({"p": p})
    if v is not None and momentum > 0:
        opt.state["p"]["v"] = v
    new = opt.apply_gradients({"p": g}, {"p": p})["p"]
    return new, opt.state["p"].get("v")


VARIANTS = [
    dict(),
    dict(weight_decay=0.01),
    dict(momentum=0.9),
    dict(momentum=0.9, weight_decay=0.01),
    dict(momentum=0.7, dampening=0.25),
    dict(momentum=0.7, dampening=0.25, weight_decay=-0.01),
    dict(momentum=0.9, nesterov=True),
    dict(momentum=0.9, nesterov=True, weight_decay=0.003),
]


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda k: ",".join(k) or "plain")
@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 33, 1000])
def test_sgd_update_matches_stock(kw, size):
    k1, k2, k3 = mx.random.split(mx.random.key(size), 3)
    p = mx.random.normal((size,), key=k1)
    g = mx.random.normal((size,), key=k2)
    v = mx.random.normal((size,), key=k3)
    lr = mx.array(0.037)
    new_p, new_v = mfs.sgd_update(p, g, v, learning_rate=lr, **kw)
    ref_p, ref_v = _stock_step(p, g, v, 0.037, **kw)
    assert_bitwise_equal(new_p, ref_p, "param")
    if kw.get("momentum", 0) > 0:
        assert_bitwise_equal(new_v, ref_v, "velocity")
    else:
        assert_bitwise_equal(new_v, v, "velocity untouched when momentum is off")


def test_sgd_update_without_velocity_starts_at_zero():
    p, g = mx.ones((5,)), mx.full((5,), 0.5)
    new_p, new_v = mfs.sgd_update(p, g, learning_rate=0.1, momentum=0.9)
    ref_p, ref_v = _stock_step(p, g, None, 0.1, momentum=0.9)
    assert_bitwise_equal(new_p, ref_p)
    assert_bitwise_equal(new_v, ref_v)
    assert mfs.sgd_update(p, g, learning_rate=0.1)[1] is None


@pytest.mark.parametrize("step", [0, 9, 10, 11, 25, 2**33 + 5])
def test_scheduled_matches_lr_form(step):
    sched = mfs.step_decay(0.1, 0.9, 10)
    p, g, v = mx.ones((37,)), mx.full((37,), 0.5), mx.full((37,), 0.25)
    s = mx.array(np.uint64(step))
    a = mfs.sgd_update_scheduled(p, g, v, step=s, schedule=sched, momentum=0.9)
    b = mfs.sgd_update(
        p, g, v, learning_rate=optim.step_decay(0.1, 0.9, 10)(s), momentum=0.9
    )
    assert_bitwise_equal(a[0], b[0])
    assert_bitwise_equal(a[1], b[1])


def test_scheduled_with_other_integer_step_dtype():
    sched = mfs.step_decay(0.1, 0.9, 10)
    p, g = mx.ones((4,)), mx.full((4,), 0.5)
    a = mfs.sgd_update_scheduled(p, g, step=mx.array(25, mx.int32), schedule=sched)
    b = mfs.sgd_update(p, g, learning_rate=optim.step_decay(0.1, 0.9, 10)(mx.array(25)))
    assert_bitwise_equal(a[0], b[0])


def test_grad_broadcast_and_non_contiguous_inputs():
    p = mx.arange(12, dtype=mx.float32).reshape(3, 4)
    g_row = mx.array([[0.5, -1.0, 2.0, 0.25]])  # broadcasts like stock
    new_p, _ = mfs.sgd_update(p, g_row, learning_rate=0.1, weight_decay=0.1)
    ref_p, _ = _stock_step(p, g_row, None, 0.1, weight_decay=0.1)
    assert_bitwise_equal(new_p, ref_p)

    pt = mx.arange(12, dtype=mx.float32).reshape(4, 3).T  # transposed view
    gt = mx.random.normal((3, 8))[:, ::2]  # strided slice
    vt = mx.random.normal((4, 3)).T
    a = mfs.sgd_update(pt, gt, vt, learning_rate=0.1, momentum=0.9, nesterov=True)
    b = _stock_step(pt, gt, vt, 0.1, momentum=0.9, nesterov=True)
    assert_bitwise_equal(a[0], b[0])
    assert_bitwise_equal(a[1], b[1])


def test_scalar_param():
    p, g = mx.array(2.0), mx.array(0.5)
    new_p, _ = mfs.sgd_update(p, g, learning_rate=0.5)
    assert new_p.shape == ()
    assert new_p.item() == 1.75


def test_many_matches_single_for_mixed_dtypes_and_chunks():
    shapes = [(3,), (4, 5), (), (17,), (2, 2, 2), (33,), (1,)]
    dtypes = [
        mx.float32,
        mx.float16,
        mx.bfloat16,
        mx.float32,
        mx.float16,
        mx.float32,
        mx.bfloat16,
    ]
    keys = mx.random.split(mx.random.key(7), 3 * len(shapes))
    params = [
        mx.random.normal(s, key=keys[3 * i]).astype(d)
        for i, (s, d) in enumerate(zip(shapes, dtypes))
    ]
    grads = [
        mx.random.normal(s, key=keys[3 * i + 1]).astype(d)
        for i, (s, d) in enumerate(zip(shapes, dtypes))
    ]
    vels = [
        mx.random.normal(s, key=keys[3 * i + 2]).astype(d)
        for i, (s, d) in enumerate(zip(shapes, dtypes))
    ]
    kw = dict(momentum=0.9, weight_decay=1e-3)
    for chunk in [1, 2, 3, 8, 100]:
        new_p, new_v = mfs.sgd_update_many(
            params, grads, vels, learning_rate=0.05, tensors_per_primitive=chunk, **kw
        )
        for i in range(len(params)):
            rp, rv = mfs.sgd_update(
                params[i], grads[i], vels[i], learning_rate=0.05, **kw
            )
            assert_bitwise_equal(new_p[i], rp, f"chunk {chunk} param {i}")
            assert_bitwise_equal(new_v[i], rv, f"chunk {chunk} velocity {i}")
    sched = mfs.step_decay(0.1, 0.5, 3)
    step = mx.array(7, mx.uint64)
    sp, sv = mfs.sgd_update_many_scheduled(
        params, grads, vels, step=step, schedule=sched, **kw
    )
    lp, lv = mfs.sgd_update_many(params, grads, vels, learning_rate=sched(step), **kw)
    for a, b in zip(sp + sv, lp + lv):
        assert_bitwise_equal(a, b)


def test_every_binding_takes_and_returns_arrays():
    """nanobind ABI: every binding must accept mx.array and return mx.array."""
    p, g, v = mx.ones((3,)), mx.ones((3,)), mx.zeros((3,))
    step = mx.array(3, mx.uint64)
    out = _ext.step_decay_lr(step, 0.1, 0.9, 2, stream=mx.cpu)
    assert isinstance(out, mx.array)
    options = _ext.SGDSettings(momentum=0.5)
    a, b, _ = _ext.sgd_update(
        [p], [g], [v], options, learning_rate=mx.array(0.1), stream=mx.cpu
    )
    c, d, _ = _ext.sgd_update(
        [p], [g], [v], options, step=step, schedule=(0.1, 0.9, 2), stream=mx.cpu
    )
    # The settings' device scalars go through the binding and back.
    with_arrays = _ext.SGDSettings(grad_scale=mx.array(2.0), master_params=[None, v])
    assert isinstance(with_arrays.grad_scale, mx.array)
    assert with_arrays.master_params[0] is None
    outs = [out, with_arrays.master_params[1]]
    outs += a + b + c + d
    assert len(outs) == 6
    for o in outs:
        assert isinstance(o, mx.array)
    mx.eval(outs)
    assert _ext.mlx_build_version == mx.__version__


def _settings_values() -> dict:
    """A value other than the default for every option of an update."""
    return {
        "momentum": 0.5,
        "weight_decay": 0.25,
        "dampening": 0.125,
        "nesterov": True,
        "maximize": True,
        "grad_scale": mx.array(2.0),
        "skip": mx.array(0, mx.uint32),
        "clip_factor": mx.array(0.5),
        "master_params": [None, mx.ones((2,))],
        "rounding_seed": 7,
        "rounding_step": mx.array(3, mx.uint64),
    }


def _same(a, b) -> bool:
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, mx.array):
        return (
            isinstance(b, mx.array)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.tolist() == b.tolist()
        )
    return type(a) is type(b) and a == b


def test_settings_keywords_attributes_and_signature():
    """SGDSettings' keywords, attributes and typed signature are made from
    the C++ lists that declare its fields: every field is all three, and
    starts at zero, False, None or empty."""
    values = _settings_values()
    fields = {
        name for name, v in vars(_ext.SGDSettings).items() if isinstance(v, property)
    }
    # A new option shows up here first: give it a value above.
    assert fields == set(values)
    defaults = _ext.SGDSettings()
    for name in fields:
        assert getattr(defaults, name) in (0.0, False, None, []), name
    given = _ext.SGDSettings(**values)
    assigned = _ext.SGDSettings()
    for name, value in values.items():
        setattr(assigned, name, value)
        assert _same(getattr(given, name), value), name
        assert _same(getattr(assigned, name), value), name
    (signature,) = _ext.SGDSettings.__init__.__nb_signature__
    for name in fields:
        assert f" {name}: " in signature[0], name


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(momentum="0.9"), r"momentum must be float, but got str '0.9'"),
        (dict(nesterov=1), r"nesterov must be bool, but got int 1"),
        (dict(rounding_seed=-1), r"rounding_seed must be int \| None"),
        (dict(master_params=None), r"master_params must be list"),
        (dict(momentun=0.9), r"unexpected keyword argument 'momentun'"),
    ],
)
def test_settings_refuse_a_bad_keyword_by_name(kw, match):
    with pytest.raises(TypeError, match=match):
        _ext.SGDSettings(**kw)


def test_every_scalar_option_is_a_public_keyword():
    """Each hyperparameter the settings hold as a Python float or bool is a
    keyword of every public update and of FusedSGD, and reaches the settings
    through functional.sgd_settings."""
    import inspect

    from mlx_fused_sgd import functional

    values = _settings_values()
    defaults = _ext.SGDSettings()
    scalar = [n for n in values if isinstance(getattr(defaults, n), (bool, float))]
    assert scalar
    for fn in (
        mfs.sgd_update,
        mfs.sgd_update_scheduled,
        mfs.sgd_update_many,
        mfs.sgd_update_many_scheduled,
        mfs.FusedSGD.__init__,
    ):
        missing = set(scalar) - set(inspect.signature(fn).parameters)
        assert not missing, (fn.__qualname__, missing)
    for name in scalar:
        kw = {name: values[name]}
        if name == "nesterov":
            kw["momentum"] = 0.5
        settings = functional.sgd_settings([], **kw)
        assert _same(getattr(settings, name), values[name]), name


@pytest.mark.parametrize(
    "call,match",
    [
        (
            lambda: mfs.sgd_update(mx.ones(3), mx.ones(4), learning_rate=0.1),
            r"grad has shape \(4,\) but param has shape \(3,\)",
        ),
        (
            lambda: mfs.sgd_update(mx.ones(3), mx.ones((2, 3)), learning_rate=0.1),
            "must have the parameter's shape or broadcast",
        ),
        (
            lambda: mfs.sgd_update(
                mx.ones(3, mx.float16), mx.ones(3), learning_rate=0.1
            ),
            "grad has dtype float32 but param has dtype float16",
        ),
        (
            lambda: mfs.sgd_update(
                mx.ones(3, mx.int32), mx.ones(3, mx.int32), learning_rate=0.1
            ),
            "param has dtype int32",
        ),
        (
            lambda: mfs.sgd_update(
                mx.ones(3), mx.ones(3), mx.ones(4), learning_rate=0.1, momentum=0.9
            ),
            r"velocity has shape \(4,\)",
        ),
        (
            lambda: mfs.sgd_update(mx.ones(3), mx.ones(3), learning_rate=mx.ones(2)),
            "learning_rate must be a scalar",
        ),
        (
            lambda: mfs.sgd_update(
                mx.ones(3), mx.ones(3), learning_rate=0.1, momentum=-1.0
            ),
            "momentum must be",
        ),
        (
            lambda: mfs.sgd_update(
                mx.ones(3), mx.ones(3), learning_rate=0.1, momentum=0.5, dampening=2.0
            ),
            "dampening must be in",
        ),
        (
            lambda: mfs.sgd_update(
                mx.ones(3), mx.ones(3), learning_rate=0.1, nesterov=True
            ),
            "Nesterov",
        ),
        (
            lambda: mfs.sgd_update_many([mx.ones(3)], [], learning_rate=0.1),
            "same length",
        ),
        (
            lambda: mfs.sgd_update_many(
                [mx.ones(3), mx.ones(2)], [mx.ones(3), mx.ones(3)], learning_rate=0.1
            ),
            r"grad\[1\] has shape",
        ),
        (
            lambda: mfs.sgd_update_scheduled(
                mx.ones(3),
                mx.ones(3),
                step=mx.array(1.0),
                schedule=mfs.step_decay(0.1, 0.9, 2),
            ),
            "integer array",
        ),
        (
            lambda: mfs.sgd_update_scheduled(
                mx.ones(3),
                mx.ones(3),
                step=mx.array([1, 2]),
                schedule=mfs.step_decay(0.1, 0.9, 2),
            ),
            "step must be a scalar",
        ),
    ],
)
def test_bad_input_raises_value_error_naming_it(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_schedule_must_be_ours():
    with pytest.raises(TypeError, match="step_decay"):
        mfs.sgd_update_scheduled(
            mx.ones(3),
            mx.ones(3),
            step=mx.array(1),
            schedule=optim.step_decay(0.1, 0.9, 2),
        )


def test_not_differentiable():
    def f(p):
        return mfs.sgd_update(p, mx.ones(3), learning_rate=0.1)[0].sum()

    # MLX's own refusal for a primitive without a vjp, naming it.
    with pytest.raises(ValueError, match="Not implemented for SGDUpdate"):
        mx.grad(f)(mx.ones(3))
