import mlx.core as mx
import numpy as np
import pytest


def to_numpy(a: mx.array) -> np.ndarray:
    """Exact host copy (bfloat16 widened to float32, which is exact)."""
    if a.dtype == mx.bfloat16:
        a = a.astype(mx.float32)
    return np.array(a)


def sgd_reference(p, g, v, lr, momentum, weight_decay, dampening, nesterov):
    """The formulas of docs/design.md, in the precision of the NumPy inputs (float64
    in the tests)."""
    g = g + weight_decay * p
    if momentum <= 0:
        return p - lr * g, v
    v = momentum * v + ((1 - dampening) * g if dampening > 0 else g)
    u = g + momentum * v if nesterov else v
    return p - lr * u, v


# On the GPU (Metal) the kernels aim for stock's bits too, but docs/design.md
# accepts a few ulp there (the Metal compiler's code generation is not ours);
# on the CPU the comparison is exact.
GPU_ULP_TOLERANCE = 4

DEVICES = ["cpu"] + (["gpu"] if mx.metal.is_available() else [])


def _ordered(bits: np.ndarray, width: int) -> np.ndarray:
    """Float bit patterns mapped to integers that are ordered like the floats
    (so that their difference counts ulps)."""
    b = bits.astype(np.int64)
    sign = np.int64(1) << (width - 1)
    return np.where(b & sign, sign - b, b + sign)


def assert_bitwise_equal(a: mx.array, b: mx.array, what: str = "") -> None:
    """Same dtype, same shape and the same bits in every element (within
    GPU_ULP_TOLERANCE ulp when the default device is the GPU)."""
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    na, nb = to_numpy(a), to_numpy(b)
    bits = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[na.itemsize]
    ba, bb = na.view(bits).reshape(-1), nb.view(bits).reshape(-1)
    tolerance = 0
    if mx.default_device() == mx.gpu and np.issubdtype(na.dtype, np.floating):
        tolerance = GPU_ULP_TOLERANCE
    if tolerance:
        width = 8 * na.itemsize
        ulps = np.abs(_ordered(ba, width) - _ordered(bb, width))
        nan_mismatch = np.isnan(na.reshape(-1)) != np.isnan(nb.reshape(-1))
        diff = np.flatnonzero((ulps > tolerance) | nan_mismatch)
    else:
        diff = np.flatnonzero(ba != bb)
    assert diff.size == 0, (
        f"{what}: {diff.size} of {na.size} elements differ, first at flat "
        f"index {diff[0]}: {na.flat[diff[0]]!r} vs {nb.flat[diff[0]]!r}"
    )


@pytest.fixture(autouse=True, params=DEVICES)
def device(request):
    """Every test runs on the CPU, and again on the GPU where MLX has one
    (Apple silicon): the default device is set for the test's duration."""
    prev = mx.default_device()
    mx.set_default_device(mx.gpu if request.param == "gpu" else mx.cpu)
    yield request.param
    mx.set_default_device(prev)
