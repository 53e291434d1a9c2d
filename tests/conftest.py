import mlx.core as mx
import numpy as np
import pytest


def to_numpy(a: mx.array) -> np.ndarray:
    """Exact host copy (bfloat16 widened to float32, which is exact)."""
    if a.dtype == mx.bfloat16:
        a = a.astype(mx.float32)
    return np.array(a)


def assert_bitwise_equal(a: mx.array, b: mx.array, what: str = "") -> None:
    """Same dtype, same shape and the same bits in every element."""
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    na, nb = to_numpy(a), to_numpy(b)
    bits = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[na.itemsize]
    diff = np.flatnonzero(na.view(bits) != nb.view(bits))
    assert diff.size == 0, (
        f"{what}: {diff.size} of {na.size} elements differ, first at flat "
        f"index {diff[0]}: {na.flat[diff[0]]!r} vs {nb.flat[diff[0]]!r}"
    )


@pytest.fixture(autouse=True)
def _cpu_default_device():
    # The CPU kernels are what these tests verify; keep MLX on the CPU even on
    # a machine with a GPU.
    prev = mx.default_device()
    mx.set_default_device(mx.cpu)
    yield
    mx.set_default_device(prev)
