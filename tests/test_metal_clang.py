"""A stricter model of the Metal Shading Language on Linux: every
kernels/*.metal compiled by clang as C++17 (MSL 3.1's base) with Metal's
address spaces as real clang address spaces (tests/metal_clang/metal_stdlib),
without exceptions or RTTI, warnings as errors (Metal's own attributes
aside, which clang does not know). A pointer passed across address spaces
fails here as it fails in Metal; the g++ harness, which erases address
spaces, cannot see that. Planted mistakes must fail."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

# Once, on the CPU: a compile check.
pytestmark = pytest.mark.devices("cpu")


ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "tests" / "metal_clang"
SOURCES = sorted((ROOT / "kernels").glob("*.metal"))


def _clang() -> str:
    for name in ("clang++-19", "clang++-18", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    if os.environ.get("MFS_REQUIRE_CLANG"):
        pytest.fail("clang is required here (MFS_REQUIRE_CLANG is set)")
    pytest.skip("clang is not installed (apt install clang-19)")


def _compile(path: Path, root: Path = ROOT) -> subprocess.CompletedProcess:
    """`path` compiled against the strict model, its "kernels/..." includes
    resolved under `root`."""
    return subprocess.run(
        [
            _clang(),
            "-x",
            "c++",
            "-std=c++17",
            "-fsyntax-only",
            "-fno-exceptions",
            "-fno-rtti",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-Wno-unknown-attributes",
            f"-I{MODEL}",
            f"-I{root}",
            str(path),
        ],
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_kernels_compile_with_real_address_spaces(source):
    proc = _compile(source)
    assert proc.returncode == 0, proc.stderr[-4000:]


PLANTED = [
    # A helper that takes the learning rate as a thread pointer, given a
    # device one.
    (
        "sgd_element.h",
        "    MFS_DEVICE const float* lr,\n    MFS_DEVICE const uint64_t* step,\n",
        "    const float* lr,\n    MFS_DEVICE const uint64_t* step,\n",
    ),
    # The per-element math taking the launch's options by thread reference,
    # given the constants' own (Metal copies no struct out of constant memory
    # implicitly, and binds no thread reference to it).
    (
        "sgd_math.h",
        "    StepScalars s,\n    MFS_CONSTANT const SGDHyper& h) {",
        "    StepScalars s,\n    const SGDHyper& h) {",
    ),
    # A helper that reads the shape from device memory, given constant.
    (
        "sgd_element.h",
        "    MFS_CONSTANT const int64_t* shape,\n    MFS_CONSTANT const int64_t* strides,",
        "    device const int64_t* shape,\n    MFS_CONSTANT const int64_t* strides,",
    ),
    # A name of namespace metal used unqualified in a header that comes
    # before the kernels' `using namespace metal`.
    (
        "sgd_math.h",
        "#define MFS_FLOAT_BITS(x) metal::as_type<uint32_t>(x)",
        "#define MFS_FLOAT_BITS(x) as_type<uint32_t>(x)",
    ),
    # A kernel argument written through a pointer to const.
    (
        "grad_check.metal",
        "device atomic_uint* flag [[buffer(mlx_fused_sgd::launch::kCheckFlag)]],\n"
        "    uint gid [[thread_position_in_grid]]) {",
        "device const atomic_uint* flag [[buffer(mlx_fused_sgd::launch::kCheckFlag)]],\n"
        "    uint gid [[thread_position_in_grid]]) {",
    ),
]


@pytest.mark.parametrize(
    "planted",
    PLANTED,
    ids=[
        "thread_lr",
        "thread_hyper",
        "device_shape",
        "unqualified_as_type",
        "const_flag",
    ],
)
def test_planted_mistakes_fail(tmp_path, planted):
    name, good, bad = planted
    text = (ROOT / "kernels" / name).read_text()
    assert good in text, "the planted mistake no longer matches the source"
    mutant = tmp_path / "kernels" / name
    mutant.parent.mkdir()
    # Beside the real headers' folder, so that "kernels/..." includes resolve.
    for header in (ROOT / "kernels").glob("*.h"):
        (mutant.parent / header.name).write_text(header.read_text())
    mutant.write_text(text.replace(good, bad, 1))
    # A header is checked through a kernel file that includes it.
    target = mutant if name.endswith(".metal") else mutant.parent / "sgd_update.metal"
    if target != mutant:
        target.write_text((ROOT / "kernels" / target.name).read_text())
    proc = _compile(target, root=tmp_path)
    assert proc.returncode != 0, "a planted mistake compiled"
    assert "error" in proc.stderr
