"""state_dtype=float32: float32 momentum buffers for float16/bfloat16 params."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

import mlx_fused_sgd as mfs

from helpers import assert_bitwise_equal, sgd_reference, to_numpy


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=str)
def test_momentum_kept_in_float32_is_closer_to_float64(dtype):
    """Small gradients accumulate in the momentum buffer: a half buffer rounds
    them away, a float32 one keeps them."""
    steps, n = 30, 4096
    key = mx.random.key(0)
    p0 = mx.random.normal((n,), key=key).astype(dtype)
    grads = [
        (mx.random.normal((n,), key=mx.random.key(i + 1)) * 1e-3).astype(dtype)
        for i in range(steps)
    ]
    kw = dict(momentum=0.99, weight_decay=1e-4)

    def run(state_dtype):
        opt = mfs.FusedSGD(0.01, state_dtype=state_dtype, **kw)
        p = {"w": p0}
        for g in grads:
            p = opt.apply_gradients({"w": g}, p)
            mx.eval(p, opt.state)
        return p["w"], opt.state["w"]["v"]

    p_half, v_half = run(None)
    p_f32, v_f32 = run(mx.float32)
    assert v_half.dtype == dtype and v_f32.dtype == mx.float32
    assert p_f32.dtype == dtype

    # float64 reference with the same roundings of the params
    ref_v = np.zeros(n)
    ref_p = to_numpy(p0).astype(np.float64)
    for g in grads:
        ref_p, ref_v = sgd_reference(
            ref_p,
            to_numpy(g).astype(np.float64),
            ref_v,
            float(np.float32(0.01)),
            dampening=0.0,
            nesterov=False,
            **kw,
        )
    err_half = np.abs(to_numpy(v_half).astype(np.float64) - ref_v).mean()
    err_f32 = np.abs(to_numpy(v_f32).astype(np.float64) - ref_v).mean()
    assert err_f32 < err_half / 4


def test_float32_state_checkpoint_round_trip(tmp_path):
    opt = mfs.FusedSGD(0.1, momentum=0.9, state_dtype=mx.float32)
    params = {"w": mx.ones((8,), mx.bfloat16)}
    for i in range(3):
        params = opt.apply_gradients(
            {"w": mx.full((8,), 0.1 * (i + 1), mx.bfloat16)}, params
        )
    mx.eval(params, opt.state)
    mx.save_safetensors(
        str(tmp_path / "opt.safetensors"), dict(tree_flatten(opt.state))
    )
    resumed = mfs.FusedSGD(0.1, momentum=0.9, state_dtype=mx.float32)
    resumed.state = tree_unflatten(
        list(mx.load(str(tmp_path / "opt.safetensors")).items())
    )
    assert resumed.state["w"]["v"].dtype == mx.float32
    g = {"w": mx.full((8,), 0.5, mx.bfloat16)}
    a = opt.apply_gradients(g, params)
    b = resumed.apply_gradients(g, params)
    assert_bitwise_equal(a["w"], b["w"])
    assert_bitwise_equal(opt.state["w"]["v"], resumed.state["w"]["v"])


def test_state_dtype_validation():
    with pytest.raises(ValueError, match="state_dtype must be None"):
        mfs.FusedSGD(0.1, momentum=0.9, state_dtype=mx.float16)
    # (A half buffer of a float32 param is widened, as stock's ops do:
    # tests/test_names_and_dtypes.py.) One half type for another is refused.
    with pytest.raises(
        ValueError, match=r"velocity has dtype float16 but param has dtype bfloat16"
    ):
        mfs.sgd_update(
            mx.ones(3, mx.bfloat16),
            mx.ones(3, mx.bfloat16),
            mx.zeros(3, mx.float16),
            learning_rate=0.1,
            momentum=0.9,
        )
    # float32 params keep float32 state whatever state_dtype says
    opt = mfs.FusedSGD(0.1, momentum=0.9, state_dtype=mx.float32)
    opt.init({"w": mx.ones((2,))})
    assert opt.state["w"]["v"].dtype == mx.float32


def test_mixed_dtypes_in_one_tree():
    opt = mfs.FusedSGD(0.1, momentum=0.9, state_dtype=mx.float32)
    params = {
        "a": mx.ones((3,), mx.float16),
        "b": mx.ones((3,)),
        "c": mx.ones((3,), mx.bfloat16),
    }
    grads = {k: mx.ones((3,), v.dtype) for k, v in params.items()}
    new = opt.apply_gradients(grads, params)
    mx.eval(new, opt.state)
    for k in params:
        assert new[k].dtype == params[k].dtype
        assert opt.state[k]["v"].dtype == mx.float32
        np.testing.assert_allclose(to_numpy(new[k]).astype(np.float64), 0.9, rtol=1e-2)
