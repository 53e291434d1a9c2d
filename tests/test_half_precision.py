"""float16/bfloat16: intermediates in float32, rounded once; the error against
a float64 reference must be no worse than stock's."""

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest

import mlx_fused_sgd as mfs

from helpers import sgd_reference, to_numpy

CONFIGS = [
    dict(momentum=0.0, weight_decay=0.0, dampening=0.0, nesterov=False),
    dict(momentum=0.9, weight_decay=1e-2, dampening=0.0, nesterov=False),
    dict(momentum=0.8, weight_decay=0.0, dampening=0.3, nesterov=False),
    dict(momentum=0.9, weight_decay=1e-3, dampening=0.0, nesterov=True),
]


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=str)
@pytest.mark.parametrize(
    "cfg",
    CONFIGS,
    ids=lambda c: (
        f"m{c['momentum']}-wd{c['weight_decay']}-d{c['dampening']}-n{c['nesterov']}"
    ),
)
def test_error_no_worse_than_stock(dtype, cfg):
    n = 20000
    k1, k2, k3 = mx.random.split(mx.random.key(3), 3)
    p = mx.random.normal((n,), key=k1).astype(dtype)
    g = (mx.random.normal((n,), key=k2) * 3).astype(dtype)
    v = mx.random.normal((n,), key=k3).astype(dtype)
    lr = 0.0625 + 0.003  # not a power of two: its rounding matters
    lr32 = float(np.float32(lr))

    ours_p, ours_v = mfs.sgd_update(p, g, v, learning_rate=mx.array(lr32), **cfg)
    stock = optim.SGD(lr32, **cfg)
    stock.init({"p": p})
    stock.state["p"]["v"] = v
    stock_p = stock.apply_gradients({"p": g}, {"p": p})["p"]
    stock_v = stock.state["p"]["v"]
    assert ours_p.dtype == dtype

    ref_p, ref_v = sgd_reference(
        *(to_numpy(a).astype(np.float64) for a in (p, g, v)), lr32, **cfg
    )
    # float32 evaluation error of a few operations, relative to the inputs'
    # magnitudes (lr, momentum < 1): matters only where the result cancels.
    f32_slack = (
        8 * 2.0**-24 * sum(np.abs(to_numpy(a).astype(np.float64)) for a in (p, g, v))
    )
    pairs = [(ours_p, stock_p, ref_p)]
    if cfg["momentum"] > 0:
        pairs.append((ours_v, stock_v, ref_v))
    for ours, st, ref in pairs:
        err_ours = np.abs(to_numpy(ours).astype(np.float64) - ref)
        err_stock = np.abs(to_numpy(st).astype(np.float64) - ref)
        assert err_ours.max() <= err_stock.max()
        assert err_ours.mean() <= err_stock.mean()
        # Rounded once: within half an ulp of the half type, plus float32 slack.
        ulp = np.spacing(
            np.abs(ref).astype(np.float16 if dtype == mx.float16 else np.float32)
        )
        if dtype == mx.bfloat16:
            ulp = ulp * 2**16  # bfloat16 has 8 bits of mantissa vs float32's 24
        assert np.all(err_ours <= 0.5 * ulp + f32_slack)
