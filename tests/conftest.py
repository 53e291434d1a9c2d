"""The test devices: every test whose result depends on the device runs on
the CPU and, where MLX has a GPU, on the GPU."""

import os

import mlx.core as mx
import pytest

# On the GPU too the comparison is exact (0 ulp): the kernels and stock's
# Metal ops are both compiled without fast math (no contraction, the precise
# pow), so the same float32 operations in the same order give the same bits.
# Only the gradient norm keeps a tolerance against the CPU and stock (the GPU
# sums float32 partials, the CPU in double; tests/test_clipping.py), though
# on each device it has the same bits every time.
# Every test runs on the CPU and, where MLX has a GPU (Metal, or MLX's CUDA
# build), on the GPU, unless its `devices` marker says otherwise;
# MFS_TEST_DEVICES=cpu (or gpu) restricts them (CI's hosted Macs: a
# paravirtual GPU that cannot stand for Apple silicon).
DEVICES = (
    os.environ["MFS_TEST_DEVICES"].split(",")
    if os.environ.get("MFS_TEST_DEVICES")
    else ["cpu"] + (["gpu"] if mx.is_available(mx.gpu) else [])
)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "devices(*names): run only on these test devices ('cpu', 'gpu'): "
        "tests whose result holds on one device, or does not depend on the "
        "device (packaging, builds, the harnesses) and runs once, on the CPU",
    )


def pytest_generate_tests(metafunc):
    """The device each test runs on: every test device, or those its
    ``devices`` marker names (skipped, with the reason, where none is
    here)."""
    if "device" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("devices")
    wanted = list(marker.args) if marker else DEVICES
    here = [d for d in wanted if d in DEVICES]
    params = here or [
        pytest.param(
            wanted[0],
            marks=pytest.mark.skip(
                reason=f"needs the {wanted[0].upper()} (MLX with Metal or CUDA)"
                if wanted[0] == "gpu"
                else f"the test devices here are {DEVICES}"
            ),
        )
    ]
    metafunc.parametrize("device", params, indirect=True)


@pytest.fixture(autouse=True)
def device(request):
    """The test's device, set as MLX's default device for its duration."""
    prev = mx.default_device()
    mx.set_default_device(mx.gpu if request.param == "gpu" else mx.cpu)
    yield request.param
    mx.set_default_device(prev)
